"""Training img/s: the platform's path (Ray Train + Lightning + our model + the slice cache) against a plain
PyTorch loop on the same model, batch, precision, augmentation and cache, in the same run.

    python benchmarks/train_throughput.py [--model resnet50] [--image-size 224] [--batch-size 128] [--out DIR]

On a CPU machine use e.g. `--image-size 64 --batch-size 32 --steps 12`. Steady-state img/s excludes the first
epoch (start-up, cudnn autotuning, worker spawn) and validation. `--profile DIR` also records a few steps of each
path's warm-up epoch with torch.profiler (outside the timed epochs) and writes one summary per path to DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, random_cache, save

from ctplatform.config import TrainConfig
from ctplatform.data.datasets import SliceDataset, load_cache_index
from ctplatform.model.augment import BasicAugment
from ctplatform.model.classifier import build_classifier
from ctplatform.model.losses import FocalLoss
from ctplatform.model.windows import hu_to_input
from ctplatform.train.lightning_import import pl


class StepProfile:
    """`--profile DIR`: a torch.profiler window of `steps` training steps, written as `<name>.txt`: wall time per
    step, the summed self time of GPU kernels per step (GPU busy share = kernels / wall) and the top operators by
    CPU time, among them the DataLoader's `__next__` (waiting for data). Comparing the paths' files tells whether
    a slower path's GPU waits for the CPU, for data, or does more work."""

    def __init__(self, out_dir: str | None, name: str, start: int, steps: int):
        self.out_dir, self.name, self.start, self.steps = out_dir, name, start, steps
        self.profiler, self.started = None, 0.0

    def step(self, index: int) -> None:
        """Call at the start of every training step `index` (0-based, counting from the first epoch)."""
        if not self.out_dir:
            return
        from torch.profiler import ProfilerActivity, profile

        if index == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
        elif index == self.start + self.steps and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = (time.perf_counter() - self.started) / self.steps
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6 / self.steps
            table = events.table(sort_by="self_cpu_time_total", row_limit=25)
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.out_dir) / f"{self.name}.txt").write_text(
                f"{self.name}: {self.steps} steps; wall {wall * 1e3:.2f} ms/step (profiler on); GPU kernels "
                f"{gpu * 1e3:.2f} ms/step; GPU busy share {gpu / wall:.2f}\n\n{table}\n")
            self.profiler = None


class StepTimer(pl.Callback):
    """Steady-state training img/s: from the start of batch `skip` to the end of the epoch's last batch, so the
    per-epoch work (validation, checkpoint save and upload) is left out; it is reported separately."""

    def __init__(self, path: str, skip: int = 5, profile: StepProfile | None = None):
        self.path, self.skip, self.profile = path, skip, profile

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.profile is not None:
            self.profile.step(trainer.global_step)
        if batch_idx == self.skip:
            self.start, self.images = self._now(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.images += batch[0].shape[0]
            self.end = self._now() if batch_idx == trainer.num_training_batches - 1 else None

    def on_train_epoch_end(self, trainer, module):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"epoch": trainer.current_epoch, "images": self.images,
                                     "seconds": (self.end or self._now()) - self.start}) + "\n")


def _profile(args, name: str) -> StepProfile:
    """A window in the second half of the warm-up epoch: past cuDNN's autotuning, outside the timed epochs (the
    profiler slows the steps it records)."""
    steps = max(1, min(10, args.steps // 2))
    return StepProfile(args.profile, name, start=args.steps - steps, steps=steps)


def plain_loop(cache: Path, args, device: torch.device, from_cache: bool, profile: StepProfile | None = None) -> float:
    torch.manual_seed(0)
    model = build_classifier(args.model, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank or 16.0)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    loss_fn, augment = FocalLoss(), BasicAugment()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    loader = DataLoader(SliceDataset(load_cache_index(cache), "train"), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.loader_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.loader_workers > 0)
    fixed = (torch.randint(-1024, 1500, (args.batch_size, args.image_size, args.image_size), dtype=torch.int16,
                           device=device), torch.rand(args.batch_size, 18, device=device))

    def batches():
        while True:
            if not from_cache:
                yield fixed
                continue
            for hu, labels, _volume, _item in loader:
                yield hu.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    stream = batches()
    images, start = 0, None
    for step in range(args.steps * (args.epochs - 1) + args.steps):
        if profile is not None:
            profile.step(step)
        if step == args.steps + 5:  # first "epoch" and 5 steps are warm-up, as on the platform path
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, images = time.perf_counter(), 0
        hu, labels = next(stream)
        x = augment(hu_to_input(hu, "three")).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = loss_fn(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += hu.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def _config(cache: Path, args, work: Path, name: str) -> TrainConfig:
    return TrainConfig(slice_dir=str(cache), storage_path=str(work / "runs"), model=args.model,
                       batch_size=args.batch_size, epochs=args.epochs, num_workers=args.loader_workers,
                       use_mixed_precision=args.precision == "bf16", limit_train_batches=args.steps,
                       cpus_per_worker=args.cpus_per_worker, run_name=name, max_failures=0, guide_checkpoints=False,
                       lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank or 16.0)


def _steady_img_per_s(timings: Path) -> float:
    epochs = [json.loads(line) for line in timings.read_text().splitlines()][1:]
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)


def lightning_alone(cache: Path, args, work: Path, ddp: bool = False) -> float:
    """The platform's module, data module and Trainer (same callbacks, precision, logging) in this process on one
    device: no Ray, and no DDP wrapper unless `ddp` (Lightning's own DDP for a world of one, as Ray Train's worker
    runs it). Against the Ray rows they split the gap into Lightning, DDP and the Ray worker."""
    from ctplatform.train.datamodule import build_datamodule
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    timings = work / f"epochs-lightning-{ddp}.jsonl"
    cfg = _config(cache, args, work, f"throughput-lightning-{ddp}")
    pl.seed_everything(0, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), preprocess=datamodule.index.settings.to_dict())
    timer = StepTimer(str(timings), profile=_profile(args, f"lightning-ddp-{ddp}"))
    trainer = build_trainer(cfg, work / f"lightning-{ddp}", extra_callbacks=[timer], devices=1,
                            strategy=pl.strategies.DDPStrategy() if ddp else "auto", enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    return _steady_img_per_s(timings)


def platform_path(cache: Path, args, work: Path, stock_ddp: bool) -> float:
    from ctplatform.ray_session import connect, shutdown_if
    from ctplatform.train.ray_launcher import build_torch_trainer, resolved

    timings = work / f"epochs-{stock_ddp}.jsonl"
    cfg = _config(cache, args, work, f"throughput-{stock_ddp}")
    started = connect(quiet=True)
    try:
        timer = StepTimer(str(timings), profile=_profile(args, f"platform-stock-{stock_ddp}"))
        build_torch_trainer(resolved(cfg), worker_callbacks=[timer], progress_bar=False, stock_ddp=stock_ddp).fit()
    finally:
        shutdown_if(started)
    return _steady_img_per_s(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    gpu = torch.cuda.is_available()
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32")
    parser.add_argument("--loader-workers", type=int, default=8 if torch.cuda.is_available() else 1)
    parser.add_argument("--cpus-per-worker", type=float, default=8 if torch.cuda.is_available() else 2)
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (alpha 2r) on both paths")
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler summary of a few warm-up steps of each path to DIR")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(args.cpus_per_worker))
    torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        volumes = max(2, args.steps * args.batch_size // 32 + 1)
        cache = random_cache(work / "cache", train_volumes=volumes, valid_volumes=2, slices=32, size=args.image_size)
        plain = plain_loop(cache, args, device, from_cache=True, profile=_profile(args, "plain-loop"))
        plain_random = plain_loop(cache, args, device, from_cache=False)
        alone = lightning_alone(cache, args, work)
        alone_ddp = lightning_alone(cache, args, work, ddp=True)
        stock = platform_path(cache, args, work, stock_ddp=True)
        ours = platform_path(cache, args, work, stock_ddp=False)
        plain_again = plain_loop(cache, args, device, from_cache=True)  # brackets drift (clocks, heat, neighbours)
        rows = [
            {"path": "plain PyTorch loop, random batch on device", "img/s": plain_random,
             "ratio": plain_random / plain},
            {"path": "plain PyTorch loop, slice cache (baseline)", "img/s": plain, "ratio": 1.0},
            {"path": "Lightning alone: same module, data module, Trainer; no Ray, no DDP", "img/s": alone,
             "ratio": alone / plain},
            {"path": "Lightning + DDP for a world of one; no Ray", "img/s": alone_ddp, "ratio": alone_ddp / plain},
            {"path": "platform, stock RayDDPStrategy (DDP, built in a side stream)", "img/s": stock,
             "ratio": stock / plain},
            {"path": "platform: Ray Train + Lightning + cache (LeanRayDDPStrategy)", "img/s": ours,
             "ratio": ours / plain},
            {"path": "plain PyTorch loop, slice cache, again at the end", "img/s": plain_again,
             "ratio": plain_again / plain},
        ]
        print_table(f"train throughput: {args.model} {args.image_size}², batch {args.batch_size}, {args.precision}, "
                    f"{args.steps} steps x {args.epochs - 1} timed epochs", rows)
        save(args.json, "train_throughput", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
