"""Run configuration: one dataclass carrying every flag of the original `run_task2.py` guide.

Field names are the guide's flags with dashes turned into underscores (`--loss-type` -> `loss_type`), with the
guide's defaults. The CLI builds a :class:`TrainConfig` from argparse; Ray Tune overrides fields by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODELS = ("resnet50", "resnet101", "efficientnet_b0")
ATTENTIONS = ("none", "se", "cbam")
LOSSES = ("focal", "bce", "asl")
MODES = ("train", "evaluate", "both", "predict")
PREDICT_TYPES = ("slices", "volumes")
AGGREGATIONS = ("mean", "max", "topk")
INPUT_WINDOWS = ("single", "three")
HEADS = ("slice", "attention-mil")
MIL_POOLINGS = ("per-class", "shared")


@dataclass
class TrainConfig:
    # --- the original guide's flags (DESIGN.md §5) ---
    mode: str = "both"
    data_dir: str = "./ct_rate_data"
    slice_dir: str = "./ct_rate_2d"
    model: str = "resnet50"
    batch_size: int = 32
    learning_rate: float = 1e-4
    epochs: int = 100
    gpu_device: int | None = None
    freeze_backbone: bool = False
    progressive_unfreeze: bool = False
    unfreeze_epoch: int = 10
    use_attention: str = "none"
    loss_type: str = "focal"
    use_advanced_aug: bool = False
    cutmix_prob: float = 0.5
    use_multiscale: bool = False
    use_mixed_precision: bool = False
    early_stopping_patience: int = 10
    # the guide's checkpoint files (top 3 + last.ckpt) in <run>/checkpoints; sweep trials turn them off: Ray's
    # own checkpoints are what a trial resumes from and exports, and each resnet50 one is ~270 MB
    guide_checkpoints: bool = True
    num_workers: int = 2
    checkpoint: str | None = None
    predict_input: list[str] = field(default_factory=list)
    predict_type: str = "slices"
    predict_metadata: str | None = None  # CT-RATE metadata CSV: the rescale of original-format volumes
    # --- loss parameters (guide defaults) ---
    focal_alpha: float = 0.85
    focal_gamma: float = 4.0
    asl_gamma_neg: float = 6.0
    asl_gamma_pos: float = 1.0
    asl_clip: float = 0.05
    mixup_alpha: float = 0.4
    weight_decay: float = 1e-5
    # --- model and data ---
    weights: str = "none"  # imagenet | none | PATH
    input_windows: str = "three"
    head: str = "slice"
    aggregation: str = "mean"  # slice head only: slice -> volume probability
    topk: int = 3
    image_size: int | None = None  # None: the cache's size
    seed: int = 0
    limit_train_batches: float | int = 1.0
    # --- attention-MIL head (`--head attention-mil`); a MIL batch holds max(1, batch_size // K) volumes of K slices,
    # so --batch-size stays the number of slices per step (the memory bound) for both heads ---
    mil_pooling: str = "per-class"  # gated attention: one distribution over slices per class, or one shared
    mil_hidden: int = 128  # width of the gated attention's projections
    mil_slices: int | None = None  # K slices per volume in training (subsampled evenly, random offsets); None: all
    mil_grad_checkpoint: bool = False  # gradient checkpointing of the slice encoder
    mil_chunk_slices: int | None = None  # at most this many slices per encoder call (None: the whole batch)
    mil_frozen_encoder: bool = False  # fixed slice encoder, features computed once and cached (MIL head only)
    mil_feature_dir: str | None = None  # where cached features go (default <slice-dir>/mil_features)
    # --- Ray Train ---
    address: str | None = None
    ray_workers: int = 1
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    storage_path: str = "./runs"
    run_name: str | None = None
    max_failures: int = 2
    report_dir: str | None = None
    output: str | None = None

    def validate(self) -> TrainConfig:
        choices = {
            "mode": MODES,
            "model": MODELS,
            "use_attention": ATTENTIONS,
            "loss_type": LOSSES,
            "predict_type": PREDICT_TYPES,
            "aggregation": AGGREGATIONS,
            "input_windows": INPUT_WINDOWS,
            "head": HEADS,
            "mil_pooling": MIL_POOLINGS,
        }
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"invalid {name.replace('_', '-')} {value!r}: choose one of {', '.join(valid)}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("--batch-size and --epochs must be at least 1")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"--cutmix-prob must be in [0, 1], got {self.cutmix_prob}")
        if self.mil_hidden < 1 or (self.mil_slices is not None and self.mil_slices < 1) or (
                self.mil_chunk_slices is not None and self.mil_chunk_slices < 1):
            raise ValueError("--mil-hidden, --mil-slices and --mil-chunk-slices must be at least 1")
        if self.head == "attention-mil" and self.use_advanced_aug:
            raise ValueError("--use-advanced-aug (CutMix/MixUp of slices) is for the slice head; the attention-mil "
                             "head trains on whole volumes")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
