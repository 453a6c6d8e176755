"""The training configuration: the concerns a training run is made of, composed into one flat record.

Field names are the command-line flags with dashes turned into underscores (`--loss-type` -> `loss_type`); Ray
Tune search spaces and config files address the same names. A Ray Train worker receives `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ctplatform.config.data import DataConfig
from ctplatform.config.loss import LossConfig
from ctplatform.config.model import LoraConfig, MilConfig, ModelConfig, check_model_name
from ctplatform.config.optim import AugmentConfig, OptimConfig
from ctplatform.config.options import check_choices
from ctplatform.config.resources import DeviceConfig, RayConfig

# Keys that run folders and sweep folders written before the configuration was split by concern still carry:
# prediction and evaluation settings that never changed what is trained.
_RETIRED_KEYS = frozenset({"mode", "checkpoint", "predict_input", "predict_type", "predict_metadata", "report_dir",
                           "output"})


@dataclass
class TrainConfig(RayConfig, DeviceConfig, AugmentConfig, OptimConfig, LossConfig, MilConfig, LoraConfig,
                  ModelConfig, DataConfig):
    """Everything that decides what a training run trains, and where."""

    def validate(self) -> TrainConfig:
        check_choices(self)
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("--batch-size and --epochs must be at least 1")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"--cutmix-prob must be in [0, 1], got {self.cutmix_prob}")
        if self.mil_hidden < 1 or (self.mil_slices is not None and self.mil_slices < 1) or (
                self.mil_chunk_slices is not None and self.mil_chunk_slices < 1):
            raise ValueError("--mil-hidden, --mil-slices and --mil-chunk-slices must be at least 1")
        check_model_name(self.model)
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora-rank must be >= 0 (0: off), --lora-alpha > 0 and --lora-dropout in [0, 1)")
        if self.lora_rank > 0 and self.head == "attention-mil" and self.mil_frozen_encoder:
            raise ValueError("--lora-rank with --mil-frozen-encoder: the adapters would never train (the encoder's "
                             "features are cached); drop one of them")
        if self.head == "attention-mil" and self.use_advanced_aug:
            raise ValueError("--use-advanced-aug (CutMix/MixUp of slices) is for the slice head; the attention-mil "
                             "head trains on whole volumes")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known - _RETIRED_KEYS
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
