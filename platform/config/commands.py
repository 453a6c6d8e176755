"""Each command's settings: the concerns it is made of, and nothing else.

`ctplatform tune --help` therefore lists no prediction flag and `ctplatform predict --help` no training flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ctplatform.config.bundle import BundleCommandConfig
from ctplatform.config.compare import CompareConfig
from ctplatform.config.predict import EvaluateConfig, ModeConfig, PredictConfig, ScoreConfig
from ctplatform.config.prepare import DemoConfig, PrepareConfig, SyntheticDataConfig
from ctplatform.config.resources import DeviceConfig
from ctplatform.config.serve import ServeConfig
from ctplatform.config.train import TrainConfig
from ctplatform.config.tune import TuneConfig


@dataclass
class RunCommand(ModeConfig, PredictConfig, EvaluateConfig, TrainConfig):
    """`ctplatform run`: every mode of the original run_task2.py entry point."""


@dataclass
class EvaluateCommand(EvaluateConfig, TrainConfig):
    """`ctplatform evaluate`: the training settings find the run whose best checkpoint is evaluated."""


@dataclass
class PredictCommand(PredictConfig, DeviceConfig):
    """`ctplatform predict`."""


@dataclass
class TuneCommand(TuneConfig, TrainConfig):
    """`ctplatform tune`: the sweep's settings and the training settings every trial starts from."""


COMMAND_CONFIGS: dict[str, type] = {
    "run": RunCommand, "train": TrainConfig, "evaluate": EvaluateCommand, "predict": PredictCommand,
    "tune": TuneCommand, "prepare": PrepareConfig, "demo-data": SyntheticDataConfig, "demo": DemoConfig,
    "score": ScoreConfig, "bundle": BundleCommandConfig, "serve": ServeConfig, "compare": CompareConfig,
}


def every_setting_name() -> frozenset[str]:
    """Names of every command's settings: a config file written for one command is read by another."""
    return frozenset(f.name for cls in COMMAND_CONFIGS.values() for f in dataclasses.fields(cls))
