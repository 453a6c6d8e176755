"""Attention-MIL against slice-level training (mean and max aggregation) on findings that occupy a few slices.

    python benchmarks/mil_vs_slice.py [--volumes 96] [--epochs 8] [--model resnet50] [--out DIR]
    python benchmarks/mil_vs_slice.py --volumes 256 --pretrain-volumes 384 --pretrain-epochs 10 \
        --model efficientnet_b0 --epochs 20 --batch-size 64 --learning-rate 3e-4    # BENCHMARKS.md's claim

Synthetic CT-RATE-shaped volumes (`ctplatform.data.synthetic`) whose findings are drawn on a few slices only; the
generator records each finding's true slice extent. Both heads get the same backbone, seed, epochs and slices per
step (`--batch-size` counts slices for both), trained with the plain Lightning loop on one split and scored on the
other. Reported per method: volume-level macro AUROC on the validation split and, for attention-MIL, the mean
attention mass that falls on the cached slices truly holding each positive finding, next to the mass a uniform
distribution over the slices would put there (chance). The same figures on the training split tell a model that
cannot fit its training volumes (an optimisation problem: more steps, other learning rates, pretrained weights)
from one that fits them and does not generalise (a data problem: more volumes).

`--oracle` adds a reference row CT-RATE cannot have: the same slice classifier trained on *slice* labels (the
generator's true extents) in a plain loop with the same windows, augmentation, loss, optimiser, learning rate,
batch, epochs and seed. It separates "the backbone cannot see the findings in this budget" from "volume labels
are too weak a signal in this budget".

With `--oracle` a last row trains attention-MIL's pooling alone, on volume labels, over the oracle's encoder
(frozen): where the attention goes when the features show the findings, apart from how well an encoder learns them
from volume labels.

`--pretrain-volumes N` starts both heads (and the oracle) from the same pretrained encoder instead of random
weights, as the challenge's winner starts from ImageNet: offline, the stand-in is the slice classifier trained on
the true slice labels of N *other* synthetic volumes (another seed: other patients, other findings), saved as a
`--weights PATH` file. It separates "the pooling cannot find the finding's slices" from "the encoder has not learnt
to see findings from volume labels in this budget". The volumes compared are still trained on volume labels only.

True extents are along the file's z axis; the cache keeps K slices within the body and records which source slices
it kept (`slice_positions`, in the reader's canonical S-A-R order), so an extent is mapped onto cache slices through
those positions (flipped when the file's z axis runs inferior-wards).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ctplatform.config import TrainConfig
from ctplatform.data.datasets import CacheIndex, load_cache_index
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.synthetic import generate_dataset, parse_size
from ctplatform.evaluation.aggregate import aggregate_slices
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.predictor import Predictor
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import ModelSpec
from ctplatform.train.datamodule import build_datamodule
from ctplatform.train.lightning_import import pl
from ctplatform.train.module import CTClassifierModule
from ctplatform.train.trainer import build_trainer


@dataclass
class BenchData:
    cache: Path
    finding_slices: dict[str, dict[str, tuple[int, int]]]  # volume name -> finding -> (first, last) file z index
    volume_paths: dict[str, Path]


def make_data(workdir: str | Path, volumes: int = 96, size: tuple[int, int, int] = (64, 64, 48), seed: int = 0,
              image_size: int = 64, num_slices: int = 16) -> BenchData:
    """Generate the synthetic data set and prepare its slice cache (in-process, no Ray)."""
    workdir = Path(workdir)
    summary = generate_dataset(workdir / "data", num_volumes=volumes, size=size, seed=seed,
                               workers=min(16, os.cpu_count() or 1))
    cache = workdir / "cache"
    run_prepare(workdir / "data", cache, PreprocessSettings(image_size=image_size, num_slices=num_slices),
                executor="local", progress=False)
    return BenchData(cache, {k: dict(v) for k, v in summary.finding_slices.items()}, dict(summary.volume_paths))


def file_z_to_position(path: Path, num_file_slices: int):
    """A function mapping a file z index to the reader's canonical slice index (axis 0 of `read_volume`)."""
    affine = nib.load(str(path)).affine
    if not np.all(np.isfinite(affine)):
        return lambda z: z  # the reader keeps the stored order when the orientation is unknown
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any() or int(ornt[2, 0]) != 2:
        raise ValueError(f"{path}: not an axial volume; this benchmark expects axial synthetic data")
    flipped = ornt[2, 1] < 0
    return (lambda z: num_file_slices - 1 - z) if flipped else (lambda z: z)


def train(cfg: TrainConfig, run_dir: Path, device: str = "cpu") -> CTClassifierModule:
    """The plain Lightning loop (the same module, data module and trainer as a Ray Train worker runs)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), preprocess=datamodule.index.settings.to_dict())
    trainer = build_trainer(cfg, run_dir, enable_progress_bar=False, accelerator="gpu" if device == "cuda" else "cpu",
                            devices=1)
    trainer.fit(module, datamodule=datamodule)
    return module


def predictor_for(module: CTClassifierModule, index: CacheIndex, device: str = "cpu") -> Predictor:
    model = module.model  # the Predictor moves it to `device` and sets eval mode
    spec = ModelSpec(architecture={"head": module.cfg.head, **model.architecture()},
                     input_windows=module.cfg.input_windows, preprocess=index.settings.to_dict())
    return Predictor(model, spec, device=device)


def volume_predictions(predictor: Predictor, index: CacheIndex, split: str) -> list[dict]:
    """Each cached volume of `split` with its labels and whole `Prediction` (slice weights and positions, which the
    attention mass needs; `ctplatform.evaluation.evaluate.predict_split` keeps only the stacked probabilities)."""
    labels = index.labels()
    out = []
    for row in index.split_volumes(split):
        record = index.volumes.iloc[row]
        slices = np.load(index.root / record["file"], mmap_mode="r")
        prediction = predictor.predict_prepared(np.asarray(slices), np.asarray(record["slice_positions"]))
        out.append({"name": record["VolumeName"], "labels": labels[row], "prediction": prediction})
    return out


def macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(score_predictions(y_true.astype(np.int64), probs)["macro"]["auroc"])


def finding_mask(data: BenchData, name: str, positions: np.ndarray) -> np.ndarray:
    """``(K, C)`` booleans: which of a volume's cached slices (canonical `positions`) lie in each finding's extent."""
    path = data.volume_paths[name]
    to_position = file_z_to_position(path, nib.load(str(path)).shape[2])
    mask = np.zeros((len(positions), len(CLASS_NAMES)), bool)
    for finding, (first, last) in data.finding_slices.get(name, {}).items():
        low, high = sorted((to_position(first), to_position(last)))
        mask[:, CLASS_NAMES.index(finding)] = (positions >= low) & (positions <= high)
    return mask


def attention_mass(results: list[dict], data: BenchData) -> tuple[float, float, int]:
    """Mean attention mass on the slices holding each positive finding, the uniform (chance) mass, and the number
    of (volume, finding) pairs that entered the means."""
    masses, chance = [], []
    for item in results:
        prediction = item["prediction"]
        mask = finding_mask(data, item["name"], prediction.slice_positions)
        for j in range(len(CLASS_NAMES)):
            inside = mask[:, j]
            if item["labels"][j] < 0.5 or not inside.any():
                continue  # negative, or the extent falls between the kept slices
            masses.append(float(prediction.slice_weights[inside, j].sum()))
            chance.append(float(inside.mean()))
    return (float(np.mean(masses)) if masses else float("nan"), float(np.mean(chance)) if chance else float("nan"),
            len(masses))


def volume_probabilities(results: list[dict], method: str | None = None) -> np.ndarray:
    """``(N, C)`` volume probabilities: a slice classifier's slice probabilities aggregated by `method` ("mean",
    "max"), or attention-MIL's own volume probabilities (`method` None)."""
    if method is None:
        return np.stack([r["prediction"].raw_probabilities for r in results])
    return np.stack([aggregate_slices(r["prediction"].slice_probabilities, method) for r in results])


def auroc_of(results: list[dict], method: str | None = None) -> float:
    """Volume-level macro AUROC of `results` (see :func:`volume_probabilities` for `method`)."""
    return macro_auroc(np.stack([r["labels"] for r in results]), volume_probabilities(results, method))


def aggregated_rows(label: str, results: list[dict], train_results: list[dict], train_s: float) -> list[dict]:
    """Volume-level rows of a slice classifier: its slice probabilities aggregated by mean and by max, scored on the
    validation split (`results`) and on the training split it was fitted on (`train_results`)."""
    return [{"method": f"{label} + {method}",
             "volume_macro_auroc": auroc_of(results, method), "train_split_auroc": auroc_of(train_results, method),
             "attention_on_finding": float("nan"), "uniform_mass": float("nan"), "train_s": train_s}
            for method in ("mean", "max")]


def train_on_slice_labels(cfg: TrainConfig, data: BenchData, device: str = "cpu") -> CTClassifierModule:
    """The oracle: the slice head trained on true slice labels with a plain loop (constant learning rate, as the
    Lightning runs keep theirs over a budget this short: ReduceLROnPlateau waits 5 epochs; bf16 autocast where the
    Lightning runs use mixed precision)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    index = load_cache_index(data.cache)
    slices, targets = [], []
    for row in index.split_volumes("train"):
        record = index.volumes.iloc[row]
        slices.append(np.load(index.root / record["file"]))
        targets.append(finding_mask(data, record["VolumeName"], np.asarray(record["slice_positions"])))
    hu = torch.from_numpy(np.concatenate(slices))
    y = torch.from_numpy(np.concatenate(targets).astype(np.float32))
    module = CTClassifierModule(cfg.to_dict(), preprocess=index.settings.to_dict()).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(hu)).split(cfg.batch_size):
            batch_on_device = (hu[batch].to(device), y[batch].to(device), None, None)
            x, target, _, _ = module.on_after_batch_transfer(batch_on_device, 0)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.use_mixed_precision):
                logits = module.model(module.head.basic_augment(x))
            loss = module.loss(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return module.eval()


def pretrain_encoder(workdir: Path, volumes: int, *, model: str, epochs: int, batch_size: int = 64,
                     learning_rate: float = 1e-3, seed: int = 0, loss_type: str = "bce",
                     size: tuple[int, int, int] = (64, 64, 48), image_size: int = 64, num_slices: int = 16,
                     device: str = "cpu") -> Path:
    """Generate `volumes` other synthetic volumes (seed + 1000: other patients, other findings), train the slice
    classifier on their true slice labels and save its weights as a `--weights PATH` file (a SliceClassifier state
    dict: the backbone keys are taken, the head is dropped). Returns the file."""
    pretrain = make_data(workdir / "pretrain", volumes, size, seed + 1000, image_size, num_slices)
    cfg = TrainConfig(slice_dir=str(pretrain.cache), model=model, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, loss_type=loss_type, num_workers=0,
                      use_mixed_precision=device == "cuda").validate()
    module = train_on_slice_labels(cfg, pretrain, device)
    out = workdir / "pretrained_encoder.pt"
    torch.save(module.model.state_dict(), out)
    return out


def compare(data: BenchData, workdir: Path, *, model: str = "resnet50", epochs: int = 8, batch_size: int = 16,
            learning_rate: float = 1e-3, seed: int = 0, loss_type: str = "bce", frozen_encoder: bool = False,
            mil_pooling: str = "per-class", mil_slices: int | None = None, oracle: bool = False,
            device: str = "cpu", loader_workers: int = 0, weights: str = "none", report=None) -> list[dict]:
    """Train both heads with the same settings and initial `weights` and score them; one row per method.
    `report(rows)` is called after each method, so a run stopped by a time limit keeps what it finished."""
    base = TrainConfig(slice_dir=str(data.cache), model=model, epochs=epochs, batch_size=batch_size,
                       learning_rate=learning_rate, seed=seed, loss_type=loss_type, num_workers=loader_workers,
                       use_gpu=device == "cuda", use_mixed_precision=device == "cuda", weights=weights,
                       early_stopping_patience=epochs + 1).validate()
    rows: list[dict] = []

    def add(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        if report:
            report(rows)

    index = load_cache_index(data.cache)

    def scored(module: CTClassifierModule) -> tuple[list[dict], list[dict]]:
        predictor = predictor_for(module, index, device)
        return volume_predictions(predictor, index, "valid"), volume_predictions(predictor, index, "train")

    started = time.perf_counter()
    # --frozen-encoder holds both heads' encoders fixed: the slice head trains its classifier layer only
    slice_module = train(base.replace(freeze_backbone=frozen_encoder).validate(), workdir / "slice", device)
    slice_seconds = time.perf_counter() - started
    add(aggregated_rows("slice-level", *scored(slice_module), slice_seconds))
    mil_cfg = base.replace(head="attention-mil", mil_pooling=mil_pooling, mil_frozen_encoder=frozen_encoder,
                           mil_slices=mil_slices, mil_feature_dir=str(workdir / "features")).validate()

    def mil_row(label: str, cfg: TrainConfig, run_dir: Path) -> dict:
        started = time.perf_counter()
        mil_module = train(cfg, run_dir, device)
        seconds = time.perf_counter() - started
        results, train_results = scored(mil_module)
        mass, chance, pairs = attention_mass(results, data)
        train_mass, train_chance, _ = attention_mass(train_results, data)
        return {"method": label, "volume_macro_auroc": auroc_of(results), "train_split_auroc": auroc_of(train_results),
                "attention_on_finding": mass, "uniform_mass": chance, "train_split_attention": train_mass,
                "train_split_uniform": train_chance, "train_s": seconds, "pairs": pairs}

    add([mil_row(f"attention-MIL ({mil_pooling})", mil_cfg, workdir / "mil")])
    if oracle:
        started = time.perf_counter()
        oracle_module = train_on_slice_labels(base, data, device)
        oracle_seconds = time.perf_counter() - started
        add(aggregated_rows("oracle: slice labels", *scored(oracle_module), oracle_seconds))
        # The pooling alone, on volume labels, over an encoder that sees the findings (the oracle's, frozen):
        # where its attention goes when the features are good, apart from how well the encoder learnt.
        encoder = workdir / "oracle_encoder.pt"
        torch.save(oracle_module.model.state_dict(), encoder)
        frozen_cfg = mil_cfg.replace(weights=str(encoder), mil_frozen_encoder=True,
                                     mil_feature_dir=str(workdir / "oracle_features")).validate()
        add([mil_row(f"attention-MIL ({mil_pooling}) on the oracle's frozen encoder", frozen_cfg,
                     workdir / "mil_oracle_encoder")])
    return rows


def main() -> None:
    from _common import print_table, save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=96)
    parser.add_argument("--size", default="64x64x48", help="ROWSxCOLSxSLICES of the synthetic volumes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-slices", type=int, default=16, help="K slices kept per volume in the cache")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="slices per step, both heads")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--loss-type", default="bce")
    parser.add_argument("--mil-pooling", default="per-class")
    parser.add_argument("--mil-slices", type=int, default=None,
                        help="attention-MIL: slices per volume in training (more volumes per step); default all")
    parser.add_argument("--frozen-encoder", action="store_true", help="both heads keep the encoder fixed: the slice "
                        "head trains its classifier layer, attention-MIL its pooling on cached features (use with "
                        "pretrained weights)")
    parser.add_argument("--oracle", action="store_true",
                        help="add the slice head trained on true slice labels (a reference CT-RATE lacks)")
    init_group = parser.add_mutually_exclusive_group()
    init_group.add_argument("--weights", default="none", help="initial weights of every model: none, imagenet or "
                            "PATH (as `ctplatform run --weights`)")
    init_group.add_argument("--pretrain-volumes", type=int, default=0,
                            help="start every model from an encoder trained on the slice labels of this many other "
                            "synthetic volumes (0: random init)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of that pretraining (default: "
                        "--epochs)")
    parser.add_argument("--pretrain-learning-rate", type=float, default=1e-3, help="learning rate of that "
                        "pretraining (from random init; --learning-rate is the compared models' fine-tuning rate)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: Lightning on one GPU with bf16 mixed precision, inference on the GPU")
    parser.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 4 on "
                        "a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_mil_"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = make_data(workdir, args.volumes, parse_size(args.size), args.seed, args.image_size, args.num_slices)
    loader_workers = args.loader_workers if args.loader_workers is not None else (4 if args.device == "cuda" else 0)
    weights, init = args.weights, "random init" if args.weights == "none" else f"weights {args.weights}"
    if args.pretrain_volumes:
        weights = str(pretrain_encoder(
            workdir, args.pretrain_volumes, model=args.model, epochs=args.pretrain_epochs or args.epochs,
            batch_size=args.batch_size, learning_rate=args.pretrain_learning_rate, seed=args.seed,
            loss_type=args.loss_type, size=parse_size(args.size), image_size=args.image_size,
            num_slices=args.num_slices, device=args.device))
        init = f"encoder pretrained on the slice labels of {args.pretrain_volumes} other volumes"
    if args.frozen_encoder:
        init += ", encoder frozen"
    title = (f"attention-MIL vs slice-level training ({args.model}, {init}, {args.volumes} volumes {args.size}, "
             f"{args.num_slices} slices of {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, "
             f"{args.device}, seed {args.seed})")

    def report(rows: list[dict]) -> None:
        print_table(title, rows)
        save(args.json, f"mil_vs_slice_seed{args.seed}", rows)

    compare(data, workdir, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, seed=args.seed, loss_type=args.loss_type,
            frozen_encoder=args.frozen_encoder, mil_pooling=args.mil_pooling, mil_slices=args.mil_slices,
            oracle=args.oracle, device=args.device, loader_workers=loader_workers, weights=weights, report=report)


if __name__ == "__main__":
    main()
