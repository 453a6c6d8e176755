"""Does the demo's recipe learn the easy preset from random weights? Three seeds, a shuffled-label control and the
realistic preset, each trained the way `ctplatform demo` trains a trial (in-process here, without Ray).

    python benchmarks/demo_learnability.py [--seeds 0 1 2] [--json PATH]

Per run: a fresh synthetic data set (the demo's volume count and size, the given preset and seed), its slice cache
(the demo's slices per volume), then the demo's training configuration (resnet50 from random weights, BCE, the
middle of the demo's learning-rate range, the demo's epochs) and the validation macro AUROC of its best epoch (as
the demo reports) and of its last. The control trains on the same easy data with the training volumes' label rows
shuffled between patients (validation labels untouched): a recipe that learns from the labels, not from something
else in the data, stays near 0.5 there. The ratio column compares each run's best AUROC with the control's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table

DEMO_LEARNING_RATE = 1e-3  # the middle of demo_space.yaml's range


def prepare_data(work: Path, preset: str, seed: int, volumes: int, size: str) -> Path:
    from ctplatform.data.prepare import run_prepare
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.data.synthetic import generate_dataset, parse_size
    from ctplatform.demo import DEMO_SLICES

    generate_dataset(work / "data", num_volumes=volumes, size=parse_size(size), seed=seed, preset=preset,
                     workers=2)
    run_prepare(work / "data", work / "cache", PreprocessSettings(image_size=64, num_slices=DEMO_SLICES),
                executor="local", progress=False)
    return work / "cache"


def shuffle_train_labels(cache: Path, out: Path, seed: int) -> Path:
    """A copy of the cache index whose training label rows are permuted between patients (the volumes are
    linked, not copied); a patient's volumes keep sharing one row, as CT-RATE's do."""
    from ctplatform.labels import CLASS_NAMES

    out.mkdir(parents=True)
    for item in cache.iterdir():
        if item.name != "index.parquet":
            (out / item.name).symlink_to(item.resolve())
    index = pd.read_parquet(cache / "index.parquet")
    train = index["split"] == "train"
    patients = index.loc[train, "patient"].unique()
    rows = index.loc[train].groupby("patient")[list(CLASS_NAMES)].first()
    permuted = dict(zip(patients, rows.loc[np.random.default_rng(seed).permutation(patients)].to_numpy(),
                        strict=True))
    index.loc[train, list(CLASS_NAMES)] = np.stack([permuted[p] for p in index.loc[train, "patient"]])
    index.to_parquet(out / "index.parquet")
    return out


def train_like_the_demo(cache: Path, run_dir: Path, epochs: int, seed: int = 0,
                        model: str | None = None) -> list[float]:
    """The demo trial's training (its TrainConfig, one CPU thread), without Ray: validation macro AUROC per
    epoch."""
    import torch

    from ctplatform.config import TrainConfig
    from ctplatform.demo import DEMO_MODEL
    from ctplatform.model.losses import class_pos_weights
    from ctplatform.train.datamodule import build_datamodule
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.module import HEADLINE_METRIC, CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    torch.set_num_threads(1)  # a demo trial's worker holds one core
    cfg = TrainConfig(slice_dir=str(cache), model=model or DEMO_MODEL, loss_type="bce", batch_size=32, epochs=epochs,
                      num_workers=0, learning_rate=DEMO_LEARNING_RATE, seed=seed).validate()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), pos_weight=class_pos_weights(datamodule.train_labels()).tolist())

    class Record(pl.Callback):
        def __init__(self):
            self.values = []

        def on_validation_end(self, trainer, pl_module):
            self.values.append(float(trainer.callback_metrics[HEADLINE_METRIC]))

    record = Record()
    trainer = build_trainer(cfg, run_dir, extra_callbacks=[record], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    return record.values


def run(seeds: list[int], volumes: int, size: str, epochs: int, realistic: bool = True,
        model: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the control right after the first seed, whose data it reuses
        cases = [("easy", seeds[0], False), ("easy", seeds[0], True)] + [("easy", s, False) for s in seeds[1:]]
        cases += [("realistic", seeds[0], False)] if realistic else []
        for preset, seed, shuffled in cases:
            work = root / f"{preset}-{seed}"
            began = time.perf_counter()
            cache = work / "cache" if work.exists() else prepare_data(work, preset, seed, volumes, size)
            if shuffled:
                cache = shuffle_train_labels(cache, root / f"shuffled-{seed}", seed)
            curve = train_like_the_demo(cache, root / f"run-{len(rows)}", epochs, model=model)
            rows.append({"preset": preset, "seed": seed, "labels": "shuffled" if shuffled else "true",
                         "best_auroc": max(curve), "last_auroc": curve[-1],
                         "curve": " ".join(f"{v:.3f}" for v in curve), "seconds": time.perf_counter() - began})
            shutil.rmtree(root / f"run-{len(rows) - 1}", ignore_errors=True)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    control = next(r["best_auroc"] for r in rows if r["labels"] == "shuffled")
    for row in rows:
        row["vs_shuffled"] = row["best_auroc"] / control
    return rows


def main() -> int:
    from ctplatform.demo import run_demo

    defaults = run_demo.__kwdefaults__
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--volumes", type=int, default=defaults["volumes"])
    parser.add_argument("--size", default=defaults["size"])
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--model", default=None, help="a backbone other than the demo's")
    parser.add_argument("--no-realistic", action="store_true", help="leave out the realistic preset's run")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = run(args.seeds, args.volumes, args.size, args.epochs, realistic=not args.no_realistic, model=args.model)
    print_table(f"demo recipe, {args.volumes} volumes of {args.size}, {args.epochs} epochs: validation macro AUROC",
                rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
