"""Training heads: how a `--head` turns a batch into logits for the loss and a validation batch into scored items.

The LightningModule (:mod:`ctplatform.train.module`) is the same for every head; :func:`build_head` picks one by
name, once. A head builds its model, converts a batch of int16 HU on the device into model input, computes training
logits (with its augmentation) and evaluation logits, and says how validation items become volume probabilities
(:meth:`VolumeHead.validation_scores`), exactly as :class:`~ctplatform.evaluation.predictor.Predictor` predicts a
volume:

* :class:`SliceHead` (``slice``): a :class:`~ctplatform.model.classifier.SliceClassifier` trained on single slices
  with their volume's labels. A validation item is a slice; a volume's probability is the aggregation
  (``--aggregation``, ``--topk``) of the sigmoid probabilities of all of its cached slices.
* :class:`AttentionMILHead` (``attention-mil``): an :class:`~ctplatform.model.mil.AttentionMILClassifier`
  (multiple-instance learning, Ilse, Tomczak & Welling 2018) trained on bags of slices with volume labels. A
  validation item is a volume (all of its cached slices); its probability is the sigmoid of the volume logit. With
  ``--mil-frozen-encoder`` the encoder body stays fixed and batches carry its cached slice features.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ctplatform.config import TrainConfig
from ctplatform.labels import NUM_CLASSES
from ctplatform.model.augment import AdvancedAugment, BasicAugment
from ctplatform.model.classifier import build_classifier
from ctplatform.model.mil import build_mil_model
from ctplatform.model.windows import hu_to_input
from ctplatform.train.slice_features import encoder_key
from ctplatform.train.stage_metrics import ValidationScores


class SliceBatch(NamedTuple):
    """A batch of slices on the device, ready for the slice head."""

    x: Tensor  # (B, 3, H, W) windowed, channels_last
    targets: Tensor  # (B, C) float: the labels of each slice's volume
    volumes: Tensor  # (B,) volume row of each slice
    items: Tensor  # (B,) dataset item numbers


class BagBatch(NamedTuple):
    """A batch of volumes as padded bags of slices (or of cached slice features) on the device."""

    x: Tensor  # (B, K, 3, H, W) windowed slices, or (B, K, D) features of a frozen encoder
    mask: Tensor  # (B, K) True on real slices
    targets: Tensor  # (B, C) float
    volumes: Tensor  # (B,) volume rows
    items: Tensor  # (B,) dataset item numbers


class VolumeHead(ABC):
    """What the LightningModule asks of a head. Models are passed in: the module owns them (its ``model.*``
    state dict keys), a head only holds its configuration and its (stateless) augmentation."""

    name: ClassVar[str]
    encoder_fixed: bool = False  # True: the encoder body never trains (no backbone freeze schedule)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.basic_augment = BasicAugment()

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model for this head, initialised as configured (``--model``, ``--weights``, ...)."""

    @abstractmethod
    def to_input(self, batch: tuple) -> SliceBatch | BagBatch:
        """The data loader's batch (int16 HU, on the device) -> the model's input batch."""

    @abstractmethod
    def training_logits(self, model: nn.Module, batch) -> tuple[Tensor, Tensor]:
        """(float32 logits, targets) of an augmented training batch, for the loss."""

    @abstractmethod
    def logits(self, model: nn.Module, batch) -> Tensor:
        """Float32 logits ``(N, C)`` of the batch's items (slices or volumes), without augmentation."""

    @abstractmethod
    def validation_scores(self) -> ValidationScores:
        """The metric that turns validation items' probabilities into volume probabilities and scores them."""

    @abstractmethod
    def on_fit_start(self, model: nn.Module, trainer) -> None:
        """Called once the model is on its device, before the first epoch."""


def lora_kwargs(cfg: TrainConfig) -> dict:
    """The model builders' LoRA and per-block checkpointing arguments from the training settings."""
    return {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "lora_targets": cfg.lora_targets, "grad_checkpoint": cfg.grad_checkpoint}


class SliceHead(VolumeHead):
    name = "slice"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.advanced_augment = AdvancedAugment(cfg.cutmix_prob, cfg.mixup_alpha) if cfg.use_advanced_aug else None

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return build_classifier(cfg.model, weights=cfg.weights, use_attention=cfg.use_attention,
                                use_multiscale=cfg.use_multiscale, num_classes=NUM_CLASSES, **lora_kwargs(cfg))

    def to_input(self, batch: tuple) -> SliceBatch:
        hu, labels, volumes, items = batch
        x = hu_to_input(hu, self.cfg.input_windows).contiguous(memory_format=torch.channels_last)
        return SliceBatch(x, labels.float(), volumes, items)

    def training_logits(self, model: nn.Module, batch: SliceBatch) -> tuple[Tensor, Tensor]:
        x, y = self.basic_augment(batch.x), batch.targets
        if self.advanced_augment is not None:  # CutMix or MixUp: the targets are mixed too
            x, y = self.advanced_augment(x, y)
        return model(x).float(), y

    def logits(self, model: nn.Module, batch: SliceBatch) -> Tensor:
        return model(batch.x).float()

    def validation_scores(self) -> ValidationScores:
        return ValidationScores(self.cfg.aggregation, self.cfg.topk, slice_level=True)

    def on_fit_start(self, model: nn.Module, trainer) -> None:
        """Nothing to prepare: slices come straight from the cache."""


class AttentionMILHead(VolumeHead):
    name = "attention-mil"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.encoder_fixed = cfg.mil_frozen_encoder

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_mil_model(cfg.model, weights=cfg.weights, use_attention=cfg.use_attention,
                                use_multiscale=cfg.use_multiscale, num_classes=NUM_CLASSES,
                                mil_pooling=cfg.mil_pooling, mil_hidden=cfg.mil_hidden,
                                checkpointing=cfg.mil_grad_checkpoint, chunk_slices=cfg.mil_chunk_slices,
                                **lora_kwargs(cfg))
        if self.encoder_fixed:
            if cfg.progressive_unfreeze:
                warnings.warn("--progressive-unfreeze is ignored with --mil-frozen-encoder (the encoder stays "
                              "fixed: its features are cached)", stacklevel=3)
            model.set_encoder_trainable(False)
        return model

    def to_input(self, batch: tuple) -> BagBatch:
        bags, mask, labels, volumes, items, _positions = batch
        if self.encoder_fixed:  # features (B, K, D) already
            return BagBatch(bags.float(), mask, labels.float(), volumes, items)
        b, k = bags.shape[:2]
        x = hu_to_input(bags.flatten(0, 1), self.cfg.input_windows)
        return BagBatch(x.view(b, k, *x.shape[1:]), mask, labels.float(), volumes, items)

    def _forward(self, model: nn.Module, batch: BagBatch, augment: bool) -> Tensor:
        x, mask = batch.x, batch.mask
        if self.encoder_fixed:
            return model.forward_features(x, mask).float()
        if augment:  # every real slice augmented independently; padding stays out of the encoder anyway
            x = x.clone()
            x[mask] = self.basic_augment(x[mask])
        return model(x, mask).float()

    def training_logits(self, model: nn.Module, batch: BagBatch) -> tuple[Tensor, Tensor]:
        return self._forward(model, batch, augment=True), batch.targets

    def logits(self, model: nn.Module, batch: BagBatch) -> Tensor:
        return self._forward(model, batch, augment=False)

    def validation_scores(self) -> ValidationScores:
        return ValidationScores(aggregation=None)

    def on_fit_start(self, model: nn.Module, trainer) -> None:
        """With a frozen encoder: compute (or read) the cached slice features and have the data module serve them."""
        if not self.encoder_fixed:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "use_features"):
            raise ValueError("--mil-frozen-encoder needs the VolumeBagDataModule (build_datamodule(cfg)) passed to "
                             "fit, which serves the cached features")
        encoder, windows = model.encoder, self.cfg.input_windows
        device = next(model.parameters()).device

        def extract(hu: Tensor) -> Tensor:
            return encoder.embed(hu_to_input(hu.to(device), windows))

        key = encoder_key(nn.ModuleList(model.encoder_body()), windows)
        datamodule.use_features(extract, key, self.cfg.mil_feature_dir)


HEADS: dict[str, type[VolumeHead]] = {head.name: head for head in (SliceHead, AttentionMILHead)}


def build_head(cfg: TrainConfig) -> VolumeHead:
    """The head named by ``cfg.head``; an unknown name is a ValueError listing the valid ones."""
    head = HEADS.get(cfg.head)
    if head is None:
        raise ValueError(f"unknown head {cfg.head!r}: choose one of {', '.join(HEADS)}")
    return head(cfg)
