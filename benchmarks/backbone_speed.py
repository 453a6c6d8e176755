"""Slices/s and peak memory per backbone, training and inference: the platform's slice classifier (timm or
torchvision backbone, LoRA on ViTs) against the same network as a plain timm/torchvision model in a plain PyTorch
loop, same batch, precision, optimiser and LoRA, in the same process.

    python benchmarks/backbone_speed.py                        # GPU: 224 px, batch 64, bf16, ViT-S/14 and ViT-B/14
    python benchmarks/backbone_speed.py --image-size 56 --batch-size 8 --steps 4 --precision fp32   # a CPU run

A training step is forward, BCE loss, backward and AdamW on what trains (ViTs: the LoRA adapters and the head;
CNNs: everything). Speeds: the best of ``--rounds`` rounds, the two paths alternating. Peak memory, in a fresh
process per measurement: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak growth of the resident set
during the steps (sampled every 5 ms). ``ratio`` = platform slices/s / plain slices/s (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, save

from ctplatform.model.classifier import build_classifier
from ctplatform.model.lora import LoraSettings, apply_lora

DEFAULT_GPU = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "convnext_tiny", "resnet50", "efficientnet_b0")
DEFAULT_CPU = ("vit_small_patch14_dinov2", "convnext_tiny", "resnet50")


class PeakMemory:
    """Peak memory (MiB) of a block: CUDA's allocator peak, or the peak growth of this process's resident set."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def _rss(self) -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096 / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base, self.running, self.top = self._rss(), True, 0.0

        def sample():
            while self.running:
                self.top = max(self.top, self._rss())
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, self._rss()) - self.base


def plain_model(name: str, lora_rank: int) -> nn.Module:
    """The same network built straight from timm/torchvision with an 18-class head (and the same LoRA targets)."""
    import timm
    import torchvision

    if name in ("resnet50", "resnet101", "efficientnet_b0"):
        return getattr(torchvision.models, name)(num_classes=18)
    kwargs = {"dynamic_img_size": True} if "vit" in name else {}
    model = timm.create_model(name, num_classes=18, **kwargs)
    if lora_rank:
        apply_lora(model, LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank), vit=hasattr(model, "blocks"))
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    return model


def stepper(model: nn.Module, args, device: torch.device, train: bool):
    """A function running one step (training: forward, BCE, backward, AdamW; inference: a no-grad forward)."""
    model = model.to(device).to(memory_format=torch.channels_last).train(train)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(args.batch_size, 18, device=device) < 0.3).float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if train else None
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            if not train:
                with torch.no_grad():
                    return model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(name: str, path: str, args) -> nn.Module:
    rank = args.lora_rank if "vit" in name else 0
    if path == "plain":
        model = plain_model(name, rank)
        if args.grad_checkpoint and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        return model
    return build_classifier(name, lora_rank=rank, lora_alpha=2.0 * rank if rank else 16.0,
                            grad_checkpoint=args.grad_checkpoint and name not in ("resnet50", "efficientnet_b0"))


def speeds(name: str, args, device: torch.device, train: bool) -> tuple[float, float]:
    """Best slices/s of the platform's model and of the plain one over ``args.rounds`` alternating rounds (a busy
    machine slows whichever runs at the time; alternating and keeping the best leaves the two comparable)."""
    torch.manual_seed(0)
    steps = {path: stepper(build(name, path, args), args, device, train) for path in ("ours", "plain")}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):
        for path, step in steps.items():
            best[path] = min(best[path], timed(step, args.steps, device))
    return tuple(args.steps * args.batch_size / best[path] for path in ("ours", "plain"))


def peak_memory(name: str, path: str, args, train: bool) -> float:
    """Peak MiB of the warm-up and timed steps, measured in a fresh process (nothing else allocated there)."""
    command = [sys.executable, __file__, "--one", name, path, "train" if train else "infer",
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps", "2",
               "--warmup", "1", "--precision", args.precision, "--lora-rank", str(args.lora_rank)]
    if args.grad_checkpoint:
        command.append("--grad-checkpoint")
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def one(args, device: torch.device) -> None:
    name, path, mode = args.one
    step = stepper(build(name, path, args), args, device, mode == "train")
    with PeakMemory(device) as memory:
        for _ in range(args.warmup + args.steps):
            step()
    print(memory.peak)


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_GPU if gpu else DEFAULT_CPU))
    parser.add_argument("--image-size", type=int, default=224 if gpu else 56)
    parser.add_argument("--batch-size", type=int, default=64 if gpu else 8)
    parser.add_argument("--steps", type=int, default=20 if gpu else 4)
    parser.add_argument("--warmup", type=int, default=5 if gpu else 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on ViTs (0: fine-tune them whole)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="per-block checkpointing (timm backbones)")
    parser.add_argument("--json", default=None, metavar="DIR")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    if args.one:
        one(args, device)
        return
    rows = []
    for name in args.backbones:
        rank = args.lora_rank if "vit" in name else 0
        trainable = sum(p.numel() for p in build(name, "ours", args).parameters() if p.requires_grad)
        row = {"backbone": name, "lora": rank or "-", "trainable": f"{trainable / 1e6:.2f}M"}
        for train in (True, False):
            mode = "train" if train else "infer"
            ours, plain = speeds(name, args, device, train)
            row.update({f"{mode} slices/s": ours, f"{mode} plain": plain, f"{mode} ratio": ours / plain,
                        f"{mode} MiB": peak_memory(name, "ours", args, train),
                        f"{mode} plain MiB": peak_memory(name, "plain", args, train)})
        rows.append(row)
        if gpu:
            torch.cuda.empty_cache()
    print_table(f"backbone speed: {args.image_size} px, batch {args.batch_size}, {args.precision}, LoRA "
                f"r={args.lora_rank} on ViTs{', grad checkpointing' if args.grad_checkpoint else ''}; best of "
                f"{args.rounds} alternating rounds of {args.steps} steps", rows)
    save(args.json, "backbone_speed", rows)


if __name__ == "__main__":
    main()
