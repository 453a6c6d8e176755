"""The Lightning loop without Ray: guide callbacks and files, progressive unfreezing, validation metrics."""

import numpy as np
import pytest
import torch

from ctplatform.config import TrainConfig
from ctplatform.train.datamodule import CTDataModule
from ctplatform.train.lightning_import import pl
from ctplatform.train.module import CTClassifierModule, multilabel_scores
from ctplatform.train.trainer import build_trainer


def tiny_config(cache, **changes) -> TrainConfig:
    values = dict(slice_dir=str(cache), model="efficientnet_b0", batch_size=16, epochs=2, num_workers=0,
                  learning_rate=1e-3, seed=0)
    values.update(changes)
    return TrainConfig(**values).validate()


class RecordTrainable(pl.Callback):
    """Records, per epoch, whether the backbone is trainable and how many params the optimizer holds."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            params = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)
            trainable = all(p.requires_grad for p in module.model.backbone_parameters())
            self.seen.append((trainer.current_epoch, trainable, params))


@pytest.mark.slow
def test_progressive_unfreeze_flips_requires_grad_at_the_epoch(tiny_cache, tmp_path):
    cfg = tiny_config(tiny_cache, epochs=3, progressive_unfreeze=True, unfreeze_epoch=2, limit_train_batches=2)
    datamodule = CTDataModule(cfg.slice_dir, cfg.batch_size, 0)
    module = CTClassifierModule(cfg.to_dict())
    recorder = RecordTrainable()
    trainer = build_trainer(cfg, tmp_path, extra_callbacks=[recorder], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    epochs = {epoch: (trainable, params) for epoch, trainable, params in recorder.seen}
    assert epochs[0][0] is False and epochs[1][0] is False and epochs[2][0] is True
    assert epochs[2][1] > epochs[1][1]  # the backbone joined the optimizer as a new param group
    head_only = len(module.model.head_parameters())
    assert epochs[0][1] == head_only


@pytest.mark.slow
def test_guide_checkpoints_logs_and_volume_metrics(tiny_cache, tmp_path):
    cfg = tiny_config(tiny_cache, epochs=2, loss_type="bce", use_advanced_aug=True, limit_train_batches=3)
    datamodule = CTDataModule(cfg.slice_dir, cfg.batch_size, 0)
    module = CTClassifierModule(cfg.to_dict(), pos_weight=[2.0] * 18)
    trainer = build_trainer(cfg, tmp_path, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in names
    guide = [n for n in names if n.startswith("multi_abnormality-epoch=")]
    assert len(guide) == 2 and all("-val_loss=" in n and n.endswith(".ckpt") for n in guide)
    assert (tmp_path / "logs" / "multi_abnormality_classification" / "version_0").is_dir()
    for key in ("val_loss", "val/volume_auroc", "val/slice_auroc", "val/volume_ap", "val/volume_f1", "lr-AdamW",
                "val/volume_f1/Cardiomegaly"):  # per class too (AUROC/AP where the class has both labels)
        assert key in trainer.callback_metrics, key
    # the checkpoint holds only plain data: it loads with weights_only=True
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["hyper_parameters"]["config"]["loss_type"] == "bce"


def test_multilabel_scores_match_sklearn_and_skip_constant_classes():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (60, 4)).astype(np.float32)
    targets[:, 3] = 0  # one label value only: left out of the AUROC/AP macro
    probs = np.clip(targets * 0.3 + rng.random((60, 4)) * 0.7, 0, 1).astype(np.float32)
    probs[:5, 0] = 0.5  # exactly at the threshold: positive, as in the official scoring (p >= 0.5)
    names = ["a", "b", "c", "d"]
    scores = multilabel_scores(torch.from_numpy(probs), torch.from_numpy(targets), names)
    auroc = [roc_auc_score(targets[:, j], probs[:, j]) for j in range(3)]
    ap = [average_precision_score(targets[:, j], probs[:, j]) for j in range(3)]
    f1 = [f1_score(targets[:, j], probs[:, j] >= 0.5, zero_division=0) for j in range(4)]
    assert scores["auroc"] == pytest.approx(np.mean(auroc), abs=1e-5)
    assert scores["ap"] == pytest.approx(np.mean(ap), abs=1e-5)
    assert scores["f1"] == pytest.approx(np.mean(f1), abs=1e-5)
    for j, name in enumerate(names[:3]):
        assert scores[f"auroc/{name}"] == pytest.approx(auroc[j], abs=1e-5)
        assert scores[f"ap/{name}"] == pytest.approx(ap[j], abs=1e-5)
    assert [scores[f"f1/{n}"] for n in names] == pytest.approx(f1, abs=1e-5)
    assert "auroc/d" not in scores and "ap/d" not in scores  # no positives: undefined, not logged as a number


@pytest.mark.parametrize("head", ["slice", "attention-mil"])
def test_model_trains_in_channels_last_like_its_input(head):
    # NCHW weights with an NHWC input convert every convolution's weight and gradient each step (0.67x the plain
    # loop's img/s on CPU for efficientnet_b0); the module keeps both NHWC.
    module = CTClassifierModule(TrainConfig(model="efficientnet_b0", head=head).to_dict())
    convs = [p for p in module.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not convs[0].is_contiguous()  # the stem (3 input channels): NHWC strides differ from NCHW ones
    seen = []
    first_conv = next(m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    hu = torch.randint(-1000, 1000, (4, 32, 32), dtype=torch.int16)
    if head == "slice":
        x, *_ = module.on_after_batch_transfer((hu, torch.zeros(4, 18), torch.zeros(4), torch.arange(4)), 0)
        module.model(x)
    else:
        bags = (hu.view(2, 2, 32, 32), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 18), torch.arange(2),
                torch.arange(2), torch.zeros(2, 2))
        x, mask, *_ = module.on_after_batch_transfer(bags, 0)
        module.model(x, mask)
    assert seen == [True]


class CountHostReads(pl.Callback):
    """Counts `Tensor.item()` calls between the first and the last training step's start that would make a GPU
    run wait for the device: every one except the optimizer's step counters, which torch keeps on the CPU when the
    model is on a GPU (AdamW reads them once per parameter)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.at_step_start: list[int] = []
        self.host_counters: set[int] = set()
        item = torch.Tensor.item

        def counted(tensor):
            if id(tensor) not in self.host_counters:
                self.calls += 1
            return item(tensor)

        monkeypatch.setattr(torch.Tensor, "item", counted)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.host_counters = {id(state["step"]) for optimizer in trainer.optimizers
                              for state in optimizer.state.values() if "step" in state}
        self.at_step_start.append(self.calls)


@pytest.mark.slow
def test_training_steps_do_not_read_the_loss_back_every_step(tiny_cache, tmp_path, monkeypatch):
    # A metric logged with prog_bar=True is read back with .item() after every step by Lightning itself (bar or no
    # bar); on a GPU the CPU then waits for each step to finish before it can queue the next one.
    cfg = tiny_config(tiny_cache, epochs=1, batch_size=4)
    counter = CountHostReads(monkeypatch)
    trainer = build_trainer(cfg, tmp_path, extra_callbacks=[counter], enable_progress_bar=True, accelerator="cpu")
    module = CTClassifierModule(cfg.to_dict())
    trainer.fit(module, datamodule=CTDataModule(cfg.slice_dir, cfg.batch_size, 0))
    # from step 1 on: step 0 creates the optimizer's step counters, which are not in the exclusion set yet
    steps = len(counter.at_step_start) - 2
    reads = counter.at_step_start[-1] - counter.at_step_start[1]
    assert steps >= 20
    assert reads <= steps / 4, f"{reads} host reads over {steps} training steps"
    assert "train_loss" in trainer.progress_bar_callback.get_metrics(trainer, module)  # the bar still shows it


@pytest.mark.parametrize("cuda, bf16, expected", [(True, True, "bf16-mixed"), (True, False, "16-mixed"),
                                                   (False, False, "bf16-mixed")])
def test_mixed_precision_is_bf16_where_the_device_supports_it_else_fp16(monkeypatch, cuda, bf16, expected):
    from ctplatform.train.trainer import precision_for

    # the machine, not the unit under test: an Ampere-or-later GPU, an older GPU (V100, T4), no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert precision_for(TrainConfig(use_mixed_precision=True)) == expected
    assert precision_for(TrainConfig(use_mixed_precision=False)) == "32-true"


def test_run_name_ignores_what_does_not_change_training():
    """Rerunning a command resumes its run only if the stable name ignores settings that do not change training:
    prediction and evaluation options, epochs (more epochs continue a run), where it is stored."""
    from ctplatform.train.ray_launcher import stable_run_name

    base = TrainConfig(slice_dir="/cache", model="efficientnet_b0")
    name = stable_run_name(base)
    for change in ({"predict_metadata": "meta.csv", "predict_input": ["a.nii.gz"], "predict_type": "volumes"},
                   {"epochs": 50, "mode": "evaluate", "report_dir": "r", "output": "o.csv"},
                   {"storage_path": "/elsewhere", "num_workers": 8, "gpu_device": 1}):
        assert stable_run_name(base.replace(**change)) == name, change
    for change in ({"learning_rate": 3e-4}, {"weights": "imagenet"}, {"slice_dir": "/other"}, {"seed": 1}):
        assert stable_run_name(base.replace(**change)) != name, change
