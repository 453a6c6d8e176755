"""The Lightning Trainer and its callbacks (no Ray here; the Ray launcher adds its strategy and callback).

Checkpoints: `multi_abnormality-epoch={epoch:02d}-val_loss={val_loss:.3f}.ckpt`, top 3 by val_loss plus
`last.ckpt`; early stopping on val_loss; learning rate logged per epoch; TensorBoard under
`<run>/logs/multi_abnormality_classification/version_N`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctplatform.config import TrainConfig
from ctplatform.train.finetune import BackboneFreezeUnfreeze
from ctplatform.train.heads import build_head
from ctplatform.train.lightning_import import pl

CHECKPOINT_FILENAME = "multi_abnormality-epoch={epoch:02d}-val_loss={val_loss:.3f}"
LOG_NAME = "multi_abnormality_classification"
# Metrics go to TensorBoard, and the progress bar redraws, every LOG_EVERY_N_STEPS training steps: each of those
# reads the step's loss back from the device, which makes the CPU wait for the GPU to finish the step.
LOG_EVERY_N_STEPS = 10


class StepLossProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's progress bar, redrawn every LOG_EVERY_N_STEPS steps, with the last step's training loss.

    The module logs its training loss without ``prog_bar=True`` because Lightning turns every progress-bar metric
    into a Python number at the end of *every* step, bar or no bar (``.item()``: on a GPU the CPU then waits for
    each step to finish before it queues the next, so any CPU-side latency, such as waiting for the next batch, adds
    to the step time instead of overlapping the GPU's work). Read here, it costs one read per redraw.
    """

    def __init__(self) -> None:
        super().__init__(refresh_rate=LOG_EVERY_N_STEPS)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train_loss_step")
        if isinstance(loss, torch.Tensor):
            items["train_loss"] = loss.item()
        return items


def precision_for(cfg: TrainConfig) -> str:
    """`--use-mixed-precision`: bf16 where the GPU supports it, else fp16; bf16 autocast on CPU."""
    if not cfg.use_mixed_precision:
        return "32-true"
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed"


def build_callbacks(cfg: TrainConfig, run_dir: str | Path) -> list:
    callbacks = [
        pl.callbacks.ModelCheckpoint(
            dirpath=str(Path(run_dir) / "checkpoints"),
            filename=CHECKPOINT_FILENAME,
            monitor="val_loss",
            mode="min",
            save_top_k=3,
            save_last=True,
            auto_insert_metric_name=False,
        )
    ] if cfg.guide_checkpoints else []
    callbacks += [
        pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=cfg.early_stopping_patience),
        pl.callbacks.LearningRateMonitor(logging_interval="epoch"),
    ]
    # a head whose encoder is fixed (cached features) has no backbone to freeze or unfreeze
    if (cfg.freeze_backbone or cfg.progressive_unfreeze) and not build_head(cfg).encoder_fixed:
        callbacks.append(BackboneFreezeUnfreeze(cfg.unfreeze_epoch if cfg.progressive_unfreeze else None))
    return callbacks


def build_trainer(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    extra_callbacks: list | None = None,
    strategy="auto",
    plugins=None,
    devices="auto",
    accelerator="auto",
    enable_progress_bar: bool = True,
) -> pl.Trainer:
    logger = pl.loggers.TensorBoardLogger(save_dir=str(Path(run_dir) / "logs"), name=LOG_NAME)
    progress_bar = [StepLossProgressBar()] if enable_progress_bar else []
    return pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        plugins=plugins,
        precision=precision_for(cfg),
        callbacks=build_callbacks(cfg, run_dir) + list(extra_callbacks or []) + progress_bar,
        logger=logger,
        enable_checkpointing=cfg.guide_checkpoints,  # else Lightning adds its own default checkpoint callback
        enable_progress_bar=enable_progress_bar,
        num_sanity_val_steps=0,
        limit_train_batches=cfg.limit_train_batches,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        deterministic=False,
        # Slices have one fixed size: let cuDNN pick the fastest kernels once (Lightning leaves it off).
        benchmark=torch.cuda.is_available(),
    )
