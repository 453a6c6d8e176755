"""Frozen backbone (`--freeze-backbone`) and progressive unfreezing at `--unfreeze-epoch` (`--progressive-unfreeze`).

Built on Lightning's `BaseFinetuning`: the backbone is frozen before the optimizer is built (so AdamW only holds the
head), and at the unfreeze epoch its parameters join the optimizer as a new group at a tenth of the current rate,
so pretrained features are not wrecked by the head's learning rate.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import ReduceLROnPlateau

from ctplatform.train.lightning_import import pl


class BackboneFreezeUnfreeze(pl.callbacks.BaseFinetuning):
    def __init__(self, unfreeze_epoch: int | None, lr_divisor: float = 10.0):
        super().__init__()
        self.unfreeze_epoch = unfreeze_epoch  # None: stay frozen for the whole run
        self.lr_divisor = lr_divisor

    def freeze_before_training(self, pl_module) -> None:
        pl_module.model.set_backbone_trainable(False)

    def finetune_function(self, pl_module, current_epoch: int, optimizer) -> None:
        if self.unfreeze_epoch is None or current_epoch != self.unfreeze_epoch:
            return
        pl_module.model.set_backbone_trainable(True)
        lr = optimizer.param_groups[0]["lr"] / self.lr_divisor
        optimizer.add_param_group({"params": pl_module.model.backbone_parameters(), "lr": lr})
        # ReduceLROnPlateau keeps one min_lr per param group, sized when it was built: extend it for the new group.
        for config in pl_module.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, ReduceLROnPlateau) and len(scheduler.min_lrs) < len(optimizer.param_groups):
                scheduler.min_lrs.append(scheduler.min_lrs[-1])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Resumed past the unfreeze epoch: BaseFinetuning.on_fit_start restored the backbone's param group, but
        # freeze_before_training froze the weights again; make them trainable before the epoch runs.
        past_unfreeze = self.unfreeze_epoch is not None and trainer.current_epoch > self.unfreeze_epoch
        if past_unfreeze and pl_module.model.backbone_frozen:
            pl_module.model.set_backbone_trainable(True)
        super().on_train_epoch_start(trainer, pl_module)
