"""The LightningModule: wires a head (:mod:`ctplatform.train.heads`), its model, the loss and the metrics.

Batches arrive as int16 HU; the head windows them (and augments training batches) on the device in batches.
Optimisation: AdamW and ReduceLROnPlateau(factor 0.5, patience 5) on ``val_loss``. Metrics: one torchmetrics
``MetricCollection`` per stage (:func:`~ctplatform.train.stage_metrics.stage_metrics`). The losses are logged as
``train_loss`` and ``val_loss`` (checkpoint names, early stopping and the scheduler monitor them); the validation
scores as ``val/{level}_{metric}`` and ``val/volume_{metric}/{class}``, with ``val/volume_auroc`` (macro AUROC of
volume probabilities) the headline. Each checkpoint also keeps the volume predictions its epoch was scored on
(``VALIDATION_PREDICTIONS_KEY``: plain lists and tensors, so ``torch.load(weights_only=True)`` still reads it).
"""

from __future__ import annotations

import warnings

import torch

from ctplatform.config import TrainConfig
from ctplatform.model.losses import build_loss
from ctplatform.train.heads import build_head
from ctplatform.train.lightning_import import pl
from ctplatform.train.stage_metrics import stage_metrics

HEADLINE_METRIC = "val/volume_auroc"
# Checkpoint key of the epoch's validation volume predictions (names, patients, probabilities, labels): a sweep
# compares trials on them (tune.summary: which trials are statistically tied with the best) without re-predicting.
VALIDATION_PREDICTIONS_KEY = "validation_predictions"


class CTClassifierModule(pl.LightningModule):
    def __init__(self, config: dict, pos_weight: list[float] | None = None, preprocess: dict | None = None):
        super().__init__()
        # Plain types only, so checkpoints load with torch.load(weights_only=True). `preprocess` (the cache's
        # settings) travels in the checkpoint so predict/serve can reproduce the training input exactly.
        self.save_hyperparameters()
        self.cfg = cfg = TrainConfig.from_dict(config).validate()
        if (cfg.freeze_backbone or cfg.progressive_unfreeze) and cfg.weights == "none":
            warnings.warn("--freeze-backbone/--progressive-unfreeze with --weights none freezes a randomly "
                          "initialised backbone: it only makes sense with --weights imagenet or PATH", stacklevel=2)
        self.head = build_head(cfg)
        # The model in channels_last like its input, so convolutions run NHWC end to end: with NCHW weights every
        # convolution converts its weight and gradient each step. Measured on CPU (benchmarks/train_throughput.py,
        # efficientnet_b0): 127 vs 186 img/s, the whole gap to the plain loop.
        self.model = self.head.build_model().to(memory_format=torch.channels_last)
        self.loss = build_loss(cfg.loss_type, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
                               asl_gamma_neg=cfg.asl_gamma_neg, asl_gamma_pos=cfg.asl_gamma_pos, asl_clip=cfg.asl_clip,
                               pos_weight=pos_weight)
        self.train_metrics = stage_metrics()
        self.val_metrics = stage_metrics(self.head.validation_scores())
        self.validation_predictions: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.head.to_input(batch)

    def on_fit_start(self) -> None:
        self.head.on_fit_start(self.model, self.trainer)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _mean_loss(metrics, loss: torch.Tensor, batch_size: int):
        """The stage's loss metric, updated with the batch's mean loss once per item: a mean weighted by batch size.
        (Not MeanMetric's `weight`: with nan_strategy="disable" torchmetrics 1.9 replaces the weights by ones.)"""
        metric = metrics["loss"]
        metric(loss.detach().expand(batch_size))
        return metric

    def training_step(self, batch, batch_idx: int):
        logits, targets = self.head.training_logits(self.model, batch)
        loss = self.loss(logits, targets)
        # Not prog_bar=True: Lightning reads progress-bar metrics back from the device after every step, which
        # stalls a GPU once per step. The trainer's StepLossProgressBar shows it at each redraw instead.
        self.log("train_loss", self._mean_loss(self.train_metrics, loss, len(targets)), on_step=True, on_epoch=True,
                 batch_size=len(targets))
        return loss

    def validation_step(self, batch, batch_idx: int):
        logits = self.head.logits(self.model, batch)
        loss = self.loss(logits, batch.targets)
        self.log("val_loss", self._mean_loss(self.val_metrics, loss, len(logits)), on_epoch=True, prog_bar=True,
                 batch_size=len(logits))
        self.val_metrics["scores"].update(logits, batch.targets, batch.volumes, batch.items)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics["scores"]
        if scores.update_count and not self.trainer.sanity_checking:
            # gathered from every process already: identical on every rank, logged without another reduction
            for name, value in scores.compute().items():
                self.log(f"val/{name}", value, prog_bar=f"val/{name}" == HEADLINE_METRIC, sync_dist=False)
            self.validation_predictions = self._kept_predictions(scores.last_volume_predictions)
        scores.reset()

    def _kept_predictions(self, scored) -> dict | None:
        if scored is None:
            return None
        rows, probs, targets = scored
        index = getattr(getattr(self.trainer, "datamodule", None), "index", None)
        if index is None:
            return None
        volumes = index.volumes.iloc[rows]
        return {"epoch": int(self.current_epoch), "volume_names": [str(v) for v in volumes["VolumeName"]],
                "patients": [str(p) for p in volumes["patient"]], "probs": torch.from_numpy(probs).double(),
                "targets": torch.from_numpy(targets).to(torch.uint8)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.validation_predictions is not None:
            checkpoint[VALIDATION_PREDICTIONS_KEY] = self.validation_predictions

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch", "frequency": 1},
        }
