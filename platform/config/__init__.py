"""Typed configuration, one small dataclass per concern; each command composes the ones it uses."""

from ctplatform.config.train import *  # noqa: F403  (transitional: split by concern in this package)
from ctplatform.config.train import TrainConfig

__all__ = ["TrainConfig"]
