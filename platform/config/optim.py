"""Optimisation and schedule: batch, learning rate, epochs, freezing, precision."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


def fraction_or_count(text: str | float | int) -> float | int:
    """'0.25' -> 0.25 (a fraction of the batches); '40' -> 40 (a count, as Lightning reads an int)."""
    value = float(text)
    return int(value) if value > 1 else value


@dataclass
class OptimConfig:
    """Optimisation: AdamW, ReduceLROnPlateau on val_loss, early stopping, backbone freezing"""

    batch_size: int = option(32, "slices per training step (per Ray Train worker)")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    epochs: int = option(100, "training epochs", aliases=("--max-epochs",))
    freeze_backbone: bool = option(False, "train the head only")
    progressive_unfreeze: bool = option(False, "start frozen, unfreeze the backbone at --unfreeze-epoch")
    unfreeze_epoch: int = option(10, "epoch at which --progressive-unfreeze unfreezes the backbone")
    early_stopping_patience: int = option(10, "epochs without a better val_loss before training stops")
    use_mixed_precision: bool = option(False, "bf16 where supported, else fp16")
    seed: int = option(0, "random seed")
    limit_train_batches: float | int = option(1.0, "fraction (or count, if > 1) of training batches per epoch",
                                              parse=fraction_or_count)
    # Sweep trials turn the top-3 + last.ckpt files off: Ray's own checkpoints are what a trial resumes from and
    # exports, and each resnet50 one is ~270 MB.
    guide_checkpoints: bool = option(True, "write the top-3 and last.ckpt Lightning checkpoints", cli=False)


@dataclass
class AugmentConfig:
    """Augmentation: rotation, flips, affine and intensity jitter always; CutMix and MixUp on request"""

    use_advanced_aug: bool = option(False, "CutMix and MixUp (labels mixed, multi-hot)")
    cutmix_prob: float = option(0.5, "with --use-advanced-aug: chance of CutMix rather than MixUp")
    mixup_alpha: float = option(0.4, "MixUp's Beta(alpha, alpha) mixing weight")
