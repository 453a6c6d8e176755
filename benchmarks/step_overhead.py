"""The platform's training step against a plain PyTorch loop on the CPU, in one process: the framework's overhead.

    python benchmarks/step_overhead.py [--model efficientnet_b0] [--image-size 32] [--batch-size 4] [--repeat 3]

A small model on small images with one torch thread makes every step short (~15-30 ms), so what a framework adds
per step (a host-device sync, a copy, Python work in a callback or a metric) is a visible share of it: the CPU
proxy for the GPU case, where such work stalls the kernel queue. Both paths read the same slice cache through the
same Dataset and DataLoader settings (no loader workers: the data path runs in the timed process for both), train
the same model with the same optimizer, loss, augmentation and precision for the same number of steps, and are
timed the same way: per epoch from batch `--skip` to the last batch, the first epoch (warm-up) left out, the
platform's validation and checkpointing outside the window. The pair runs `--repeat` times, in alternating order
(plain then platform, platform then plain, ...); the overhead is platform s/step over plain s/step, median over
the pairs (goal <= 1.05). `--clock cpu` times both paths in the process's CPU seconds instead of wall seconds: on a
shared machine other jobs stretch wall time by whatever they take, CPU time only by cache and memory contention.

The platform path: `CTClassifierModule` + `build_datamodule` + `build_trainer` (its callbacks, logger, precision),
in this process (no Ray: the Ray worker's own cost is in `train_throughput.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, random_cache, save
from train_throughput import StepTimer, _config

from ctplatform.data.datasets import SliceDataset, load_cache_index
from ctplatform.model.augment import BasicAugment
from ctplatform.model.classifier import build_classifier
from ctplatform.model.losses import FocalLoss
from ctplatform.model.windows import hu_to_input
from ctplatform.train.lightning_import import pl

# wall: elapsed seconds (what a user waits for); cpu: this process's CPU seconds, all its threads (the logger's
# writer thread too), which other jobs on a shared machine barely move: the figure to read on a busy machine
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def plain_loop(cache: Path, args) -> float:
    """Seconds per step of a plain eager loop, timed per epoch like `StepTimer`."""
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    model = build_classifier(args.model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    loss_fn, augment = FocalLoss(), BasicAugment()
    loader = DataLoader(SliceDataset(load_cache_index(cache), "train"), batch_size=args.batch_size, shuffle=True,
                        num_workers=0, drop_last=True)
    seconds, steps = 0.0, 0
    for epoch in range(args.epochs):
        start = None
        for index, (hu, labels, _volume, _item) in enumerate(loader):
            if index == args.steps:
                break
            if index == args.skip:
                start = clock()
            # the platform's order: channels-last input (SliceHead.to_input), then the augmentation
            x = augment(hu_to_input(hu, "three").contiguous(memory_format=torch.channels_last))
            loss = loss_fn(model(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch > 0:
            seconds += clock() - start
            steps += args.steps - args.skip
    return seconds / steps


class ClockedStepTimer(StepTimer):
    """`StepTimer` on the chosen clock (the CPU runs here: no device to synchronise)."""

    def __init__(self, path: str, skip: int, clock):
        super().__init__(path, skip=skip)
        self.clock = clock

    def _now(self) -> float:
        return self.clock()


def platform_step(cache: Path, args, work: Path, run: int) -> float:
    """Seconds per step of the platform's Lightning path (module, data module, trainer) in this process."""
    from ctplatform.train.datamodule import build_datamodule
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    timings = work / f"epochs-{run}.jsonl"
    cfg = _config(cache, args, work, f"step-overhead-{run}")
    pl.seed_everything(0, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), preprocess=datamodule.index.settings.to_dict())
    timer = ClockedStepTimer(str(timings), args.skip, CLOCKS[args.clock])
    trainer = build_trainer(cfg, work / f"lightning-{run}", extra_callbacks=[timer],
                            devices=1, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    epochs = [json.loads(line) for line in timings.read_text().splitlines()][1:]
    return sum(e["seconds"] for e in epochs) / (len(epochs) * (args.steps - args.skip))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="training steps per epoch")
    parser.add_argument("--skip", type=int, default=5, help="steps at the start of each epoch left out of the timing")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="plain/platform pairs; the ratio is their median")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall seconds (default) or the process's CPU seconds (steadier on a shared machine)")
    parser.add_argument("--json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    if args.epochs < 2 or not 0 <= args.skip < args.steps or args.repeat < 1:
        parser.error("need --epochs >= 2, 0 <= --skip < --steps and --repeat >= 1")
    # What `_config` reads for the platform path: fp32, no loader workers, no LoRA, the torch threads.
    args.precision, args.loader_workers, args.lora_rank, args.cpus_per_worker = "fp32", 0, 0, args.threads
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    try:
        volumes = max(2, args.steps * args.batch_size // 32 + 1)
        cache = random_cache(work / "cache", train_volumes=volumes, valid_volumes=2, slices=32, size=args.image_size)
        pairs = []
        for run in range(args.repeat):
            if run % 2 == 0:  # alternate the order (ABBA), so a drift in the machine's speed cancels out
                pairs.append((plain_loop(cache, args), platform_step(cache, args, work, run)))
            else:
                ours = platform_step(cache, args, work, run)
                pairs.append((plain_loop(cache, args), ours))
            print(f"pair {run + 1}/{args.repeat}: plain {pairs[-1][0] * 1e3:.2f} ms/step, platform "
                  f"{pairs[-1][1] * 1e3:.2f} ms/step", flush=True)
        ratios = [ours / plain for plain, ours in pairs]
        plain_ms = statistics.median(p for p, _ in pairs) * 1e3
        ours_ms = statistics.median(o for _, o in pairs) * 1e3
        rows = [
            {"path": "plain PyTorch loop (baseline)", "ms/step": plain_ms,
             "img/s": args.batch_size / plain_ms * 1e3, "s/step vs plain": 1.0, "per pair": ""},
            {"path": "platform: CTClassifierModule + build_trainer, no Ray", "ms/step": ours_ms,
             "img/s": args.batch_size / ours_ms * 1e3, "s/step vs plain": statistics.median(ratios),
             "per pair": " ".join(f"{r:.3f}" for r in ratios)},
        ]
        print_table(f"step overhead: {args.model} {args.image_size}², batch {args.batch_size}, fp32, "
                    f"{args.threads} thread(s), {args.steps} steps x {args.epochs - 1} timed epochs, median of "
                    f"{args.repeat} pairs, {args.clock} clock; load average {os.getloadavg()[0]:.2f}", rows)
        save(args.json, "step_overhead", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
