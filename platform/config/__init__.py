"""Typed settings, one small dataclass per concern (data, model, loss, optimisation, augmentation, resources,
prediction, tuning, serving); each command composes the ones it uses (`ctplatform.config.commands`)."""

from ctplatform.config.train import TrainConfig

__all__ = ["TrainConfig"]
