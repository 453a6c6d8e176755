"""The LightningModule: wires the plain model, loss and augmentation (ctplatform.model) with the guide's recipe.

AdamW + ReduceLROnPlateau(factor 0.5, patience 5) on val_loss (DESIGN.md §5). Batches arrive as int16 HU; HU
windowing and augmentation run on the device in batches. Validation logs slice-level and volume-level metrics;
`val/volume_auroc` (macro AUROC of volume probabilities aggregated from slices) is the headline metric.

`--head attention-mil`: batches are padded bags of slices with a mask (`VolumeBagDataModule`); the model is
:class:`~ctplatform.model.mil.AttentionMILClassifier`, the loss is on volume logits and validation logs volume
metrics only (`val/volume_*`, same headline). With `--mil-frozen-encoder` the encoder body is fixed, its slice
features are computed once at the start of fitting (and cached on disk), and batches carry those features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multilabel_auroc,
    multilabel_average_precision,
    multilabel_f1_score,
)

from ctplatform.config import TrainConfig
from ctplatform.evaluation.aggregate import aggregate_by_volume
from ctplatform.labels import CLASS_NAMES, NUM_CLASSES
from ctplatform.model.augment import AdvancedAugment, BasicAugment
from ctplatform.model.classifier import build_classifier
from ctplatform.model.losses import build_loss
from ctplatform.model.mil import build_mil_model
from ctplatform.model.windows import hu_to_input
from ctplatform.train.lightning_import import pl

HEADLINE_METRIC = "val/volume_auroc"


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Macro AUROC, AP and F1 at p >= 0.5 (the official decision rule) with torchmetrics; classes with one label
    value are left out of AUROC/AP (as the official scoring does) instead of counting as 0. With `class_names`,
    also each class's score as ``"{metric}/{class name}"`` (AUROC and AP only where the class has both labels)."""
    targets = targets.round().int()
    num_labels = probs.shape[1]
    varied = (targets.min(dim=0).values != targets.max(dim=0).values).cpu().numpy()
    # integer predictions are taken as decisions: torchmetrics' own threshold would test p > 0.5
    f1 = multilabel_f1_score((probs >= 0.5).int(), targets, num_labels=num_labels, average=None).cpu().numpy()
    scores = {"f1": float(np.mean(f1))}
    per_class = {"f1": f1}
    if varied.any():
        per_class["auroc"] = multilabel_auroc(probs, targets, num_labels=num_labels, average=None).cpu().numpy()
        per_class["ap"] = multilabel_average_precision(probs, targets, num_labels=num_labels,
                                                       average=None).cpu().numpy()
        scores["auroc"] = float(np.mean(per_class["auroc"][varied]))
        scores["ap"] = float(np.mean(per_class["ap"][varied]))
    if class_names is not None:
        for metric, values in per_class.items():
            scores.update({f"{metric}/{name}": float(values[j]) for j, name in enumerate(class_names)
                           if metric == "f1" or varied[j]})
    return scores


class CTClassifierModule(pl.LightningModule):
    def __init__(self, config: dict, pos_weight: list[float] | None = None, preprocess: dict | None = None):
        super().__init__()
        # Plain types only, so checkpoints load with torch.load(weights_only=True). `preprocess` (the cache's
        # settings) travels in the checkpoint so predict/serve can reproduce the training input exactly.
        self.save_hyperparameters()
        self.cfg = TrainConfig.from_dict(config).validate()
        cfg = self.cfg
        if (cfg.freeze_backbone or cfg.progressive_unfreeze) and cfg.weights == "none":
            warnings.warn("--freeze-backbone/--progressive-unfreeze with --weights none freezes a randomly "
                          "initialised backbone: it only makes sense with --weights imagenet or PATH", stacklevel=2)
        self.is_mil = cfg.head == "attention-mil"
        self.frozen_encoder = self.is_mil and cfg.mil_frozen_encoder
        if self.is_mil:
            self.model = build_mil_model(cfg.model, weights=cfg.weights, use_attention=cfg.use_attention,
                                         use_multiscale=cfg.use_multiscale, num_classes=NUM_CLASSES,
                                         mil_pooling=cfg.mil_pooling, mil_hidden=cfg.mil_hidden,
                                         checkpointing=cfg.mil_grad_checkpoint, chunk_slices=cfg.mil_chunk_slices)
            if self.frozen_encoder:
                if cfg.progressive_unfreeze:
                    warnings.warn("--progressive-unfreeze is ignored with --mil-frozen-encoder (the encoder stays "
                                  "fixed: its features are cached)", stacklevel=2)
                self.model.set_encoder_trainable(False)
        else:
            self.model = build_classifier(cfg.model, weights=cfg.weights, use_attention=cfg.use_attention,
                                          use_multiscale=cfg.use_multiscale, num_classes=NUM_CLASSES)
        # The model in channels_last like its input (on_after_batch_transfer), so convolutions run NHWC end to
        # end: with NCHW weights every convolution converts its weight and gradient each step. Measured on CPU
        # (benchmarks/train_throughput.py, efficientnet_b0): 127 vs 186 img/s, the whole gap to the plain loop.
        self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = build_loss(cfg.loss_type, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                               asl_gamma_neg=cfg.asl_gamma_neg, asl_gamma_pos=cfg.asl_gamma_pos, asl_clip=cfg.asl_clip,
                               pos_weight=pos_weight)
        self.basic_augment = BasicAugment()
        self.advanced_augment = AdvancedAugment(cfg.cutmix_prob, cfg.mixup_alpha) if cfg.use_advanced_aug else None
        self._val_batches: list[tuple[torch.Tensor, ...]] = []
        self.last_val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ data on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.is_mil:
            return self._bag_to_input(batch)
        hu, labels, volume, item = batch
        x = hu_to_input(hu, self.cfg.input_windows).contiguous(memory_format=torch.channels_last)
        return x, labels.float(), volume, item

    def _bag_to_input(self, batch):
        bags, mask, labels, volume, item, _positions = batch
        if self.frozen_encoder:  # features (B, K, D) already
            return bags.float(), mask, labels.float(), volume, item
        b, k = bags.shape[:2]
        x = hu_to_input(bags.flatten(0, 1), self.cfg.input_windows)
        return x.view(b, k, *x.shape[1:]), mask, labels.float(), volume, item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_fit_start(self) -> None:
        if not self.frozen_encoder:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "use_features"):
            raise ValueError("--mil-frozen-encoder needs the VolumeBagDataModule (build_datamodule(cfg)) passed to "
                             "fit, which serves the cached features")
        from ctplatform.train.slice_features import encoder_key

        encoder, windows, device = self.model.encoder, self.cfg.input_windows, self.device
        encoder_body = torch.nn.ModuleList(self.model.encoder_body())

        def extract(hu: torch.Tensor) -> torch.Tensor:
            return encoder.embed(hu_to_input(hu.to(device), windows))

        datamodule.use_features(extract, encoder_key(encoder_body, windows), self.cfg.mil_feature_dir)

    # ------------------------------------------------------------------ steps
    def _mil_forward(self, x: torch.Tensor, mask: torch.Tensor, augment: bool) -> torch.Tensor:
        if self.frozen_encoder:
            return self.model.forward_features(x, mask)
        if augment:  # every real slice augmented independently; padding stays out of the encoder anyway
            x = x.clone()
            x[mask] = self.basic_augment(x[mask])
        return self.model(x, mask)

    def training_step(self, batch, batch_idx: int):
        if self.is_mil:
            x, mask, y, _, _ = batch
            loss = self.loss(self._mil_forward(x, mask, augment=True).float(), y)
            self._log_train_loss(loss, x.shape[0])
            return loss
        x, y, _, _ = batch
        x = self.basic_augment(x)
        if self.advanced_augment is not None:
            x, y = self.advanced_augment(x, y)
        loss = self.loss(self.model(x).float(), y)
        self._log_train_loss(loss, x.shape[0])
        return loss

    def _log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        # Not prog_bar=True: Lightning reads progress-bar metrics back from the device after every step, which
        # stalls a GPU once per step. The trainer's StepLossProgressBar shows it at each redraw instead.
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=batch_size)

    def validation_step(self, batch, batch_idx: int):
        if self.is_mil:
            x, mask, y, volume, item = batch
            logits = self._mil_forward(x, mask, augment=False).float()
        else:
            x, y, volume, item = batch
            logits = self.model(x).float()
        loss = self.loss(logits, y)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self._val_batches.append((torch.sigmoid(logits).detach(), y, volume, item))

    def on_validation_epoch_start(self) -> None:
        self._val_batches.clear()

    def on_validation_epoch_end(self) -> None:
        if not self._val_batches or self.trainer.sanity_checking:
            self._val_batches.clear()
            return
        probs, targets, volumes, items = (torch.cat(parts) for parts in zip(*self._val_batches, strict=True))
        self._val_batches.clear()
        if self.trainer.world_size > 1:  # every rank holds a shard (padded with duplicates): gather, then dedupe
            gathered = (self.all_gather(t).flatten(0, 1) for t in (probs, targets, volumes, items))
            probs, targets, volumes, items = gathered
        items_np = items.cpu().numpy()
        _, first = np.unique(items_np, return_index=True)
        keep = torch.as_tensor(first, device=probs.device)
        probs, targets, volumes = probs[keep].cpu(), targets[keep].cpu(), volumes[keep].cpu()
        if self.is_mil:  # one item per volume already
            metrics = {f"val/volume_{k}": v for k, v in multilabel_scores(probs, targets, CLASS_NAMES).items()}
            self._log_validation(metrics)
            return
        metrics = {f"val/slice_{k}": v for k, v in multilabel_scores(probs, targets).items()}
        ids, volume_probs = aggregate_by_volume(probs.numpy(), volumes.numpy(), self.cfg.aggregation, self.cfg.topk)
        volume_targets = np.stack([targets[volumes == v][0].numpy() for v in ids])
        metrics.update(
            {f"val/volume_{k}": v for k, v in
             multilabel_scores(torch.from_numpy(volume_probs), torch.from_numpy(volume_targets),
                               CLASS_NAMES).items()}
        )
        self._log_validation(metrics)

    def _log_validation(self, metrics: dict[str, float]) -> None:
        self.last_val_metrics = metrics
        # Identical on every rank after the gather: log without another reduction. The headline on the bar.
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == HEADLINE_METRIC, sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch", "frequency": 1},
        }
