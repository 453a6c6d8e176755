"""Optuna (TPE) + ASHA against random search without early stopping, at the same trial budget, in one run.

    python benchmarks/tune_efficiency.py [--trials 8] [--epochs 4] [--volumes 64] [--out DIR]

Reports, for each strategy: the best validation metric reached, the epochs trained in total (the cost), their
ratio against random search, and the seconds from a trial's start to its first training step (Ray Train start-up).
Goal: the same best metric as random search with at most half its epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, save

from ctplatform.config import TrainConfig
from ctplatform.config.tune import TuneConfig
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.synthetic import generate_dataset
from ctplatform.ray_session import connect, shutdown_if
from ctplatform.train.lightning_import import pl
from ctplatform.tune.space import load_space
from ctplatform.tune.sweep import run_sweep


class FirstStep(pl.Callback):
    """Appends (Train run name, wall time of the first training step, of the worker's setup) to a file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            import ray.train

            with open(self.path, "a") as handle:
                handle.write(json.dumps({"run": ray.train.get_context().get_experiment_name(),
                                         "first_step": time.time()}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--volumes", type=int, default=64)
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    started = connect(quiet=True)
    try:
        generate_dataset(work / "data", num_volumes=args.volumes, size=(64, 64, 48), seed=0)
        run_prepare(work / "data", work / "cache", PreprocessSettings(image_size=64, num_slices=8), progress=False)
        base = TrainConfig(slice_dir=str(work / "cache"), model="resnet50", batch_size=32, epochs=args.epochs,
                           num_workers=0, use_gpu=None)
        rows = []
        for name, searcher, scheduler in (("random, no early stopping", "random", "fifo"),
                                          ("Optuna TPE + ASHA", "optuna", "asha")):
            marks = work / f"{searcher}.jsonl"
            settings = TuneConfig(name=searcher, storage_path=str(work / "runs"), num_samples=args.trials,
                                     seed=0, searcher=searcher, scheduler=scheduler)
            summary = run_sweep(base, load_space("demo_space.yaml"), settings, export_best=False,
                                worker_callbacks=[FirstStep(str(marks))])
            trials = pd.read_csv(Path(summary["sweep_dir"]) / "summary" / "trials.csv")
            firsts = pd.read_json(marks, lines=True)
            starts = {p.name.split("_")[2]: json.loads((p / "result.json").read_text().splitlines()[0])
                      for p in Path(summary["sweep_dir"]).glob("run_trial_*") if (p / "result.json").stat().st_size}
            # trial start = its first result's timestamp minus time_total_s (Tune's clock of the trial; 1 s steps)
            trial_start = {tid: r["timestamp"] - r["time_total_s"] for tid, r in starts.items()}
            latencies = [first - trial_start[run.removeprefix("trial_")]
                         for run, first in zip(firsts["run"], firsts["first_step"], strict=True)
                         if run.removeprefix("trial_") in trial_start]
            rows.append({"strategy": name, "best val/volume_auroc": float(trials["best_val/volume_auroc"].max()),
                         "epochs trained": int(trials["epochs"].sum()),
                         "stopped early": int((trials["state"] == "stopped early").sum()),
                         "s to first step (median)": float(pd.Series(latencies).median()) if latencies else None,
                         "sweep s": summary["seconds"]})
        for row in rows:
            row["epochs vs random"] = row["epochs trained"] / rows[0]["epochs trained"]
        print_table(f"tune efficiency: {args.trials} trials x up to {args.epochs} epochs, resnet50 64², "
                    f"{args.volumes} synthetic volumes", rows)
        save(args.json, "tune_efficiency", rows)
    finally:
        shutdown_if(started)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
