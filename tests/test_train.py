"""The Lightning loop without Ray: callbacks and checkpoint files, progressive unfreezing, heads, validation metrics,
loading older checkpoints."""

import numpy as np
import pytest
import torch

from ctplatform.config import TrainConfig
from ctplatform.train.datamodule import CTDataModule
from ctplatform.train.lightning_import import pl
from ctplatform.train.module import CTClassifierModule
from ctplatform.train.stage_metrics import multilabel_scores
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
def test_checkpoint_files_logs_and_volume_metrics(tiny_cache, tmp_path):
    cfg = tiny_config(tiny_cache, epochs=2, loss_type="bce", use_advanced_aug=True, limit_train_batches=3)
    datamodule = CTDataModule(cfg.slice_dir, cfg.batch_size, 0)
    module = CTClassifierModule(cfg.to_dict(), pos_weight=[2.0] * 18)
    trainer = build_trainer(cfg, tmp_path, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in names
    per_epoch = [n for n in names if n.startswith("multi_abnormality-epoch=")]
    assert len(per_epoch) == 2 and all("-val_loss=" in n and n.endswith(".ckpt") for n in per_epoch)
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
    from ctplatform.cli import parse_settings
    from ctplatform.config.options import project
    from ctplatform.train.ray_launcher import stable_run_name

    base = TrainConfig(slice_dir="/cache", model="efficientnet_b0")
    name = stable_run_name(base)
    for extra in (["--predict-metadata", "meta.csv", "--predict-input", "a.nii.gz", "--predict-type", "volumes"],
                  ["--epochs", "50", "--mode", "evaluate", "--report-dir", "r", "--output", "o.csv"],
                  ["--storage-path", "/elsewhere", "--num-workers", "8", "--gpu-device", "1"]):
        settings = parse_settings(["run", "--slice-dir", "/cache", "--model", "efficientnet_b0", *extra])
        assert stable_run_name(project(settings, TrainConfig)) == name, extra
    for change in ({"learning_rate": 3e-4}, {"weights": "imagenet"}, {"slice_dir": "/other"}, {"seed": 1}):
        assert stable_run_name(base.replace(**change)) != name, change


class KeepVolumeProbabilities(pl.Callback):
    """The validation metric's volume probabilities of the last epoch (callbacks run before the module's epoch-end
    hook, which scores and resets the metric)."""

    def on_validation_epoch_end(self, trainer, module):
        self.volumes, self.probs, self.targets = module.val_metrics["scores"].volume_probabilities()


@pytest.mark.slow
@pytest.mark.parametrize(("head", "aggregation"), [("slice", "topk"), ("slice", "mean"), ("attention-mil", "max")])
def test_validation_scores_the_probabilities_the_checkpoint_predicts(tiny_cache, tmp_path, head, aggregation):
    """Validation aggregates the sigmoid probabilities of all of a volume's cached slices as prediction does (the
    attention head: one volume logit), so the logged volume AUROC is the official scoring of what the checkpoint
    predicts."""
    from ctplatform.evaluation.evaluate import predict_split
    from ctplatform.evaluation.metrics import score_predictions
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.train.datamodule import build_datamodule

    cfg = tiny_config(tiny_cache, epochs=1, head=head, aggregation=aggregation, model="resnet50", loss_type="bce",
                      limit_train_batches=2)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), preprocess=datamodule.index.settings.to_dict())
    kept = KeepVolumeProbabilities()
    trainer = build_trainer(cfg, tmp_path, extra_callbacks=[kept], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    split = predict_split(Predictor.from_path(tmp_path / "checkpoints" / "last.ckpt", device="cpu"), tiny_cache)
    assert split["probs"].std(axis=0).max() > 1e-4, "the model's outputs are constant: nothing to compare"
    np.testing.assert_array_equal(kept.volumes, datamodule.index.split_volumes("valid"))
    np.testing.assert_allclose(kept.probs, split["probs"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(kept.targets, split["y_true"])
    official = score_predictions(split["y_true"], split["probs"])
    assert float(trainer.callback_metrics["val/volume_auroc"]) == pytest.approx(official["macro"]["auroc"], abs=1e-6)
    for name, scores in official["per_class"].items():
        assert float(trainer.callback_metrics[f"val/volume_f1/{name}"]) == pytest.approx(scores["f1"], abs=1e-6)
        if scores["auroc"] is not None:
            assert float(trainer.callback_metrics[f"val/volume_auroc/{name}"]) == pytest.approx(scores["auroc"],
                                                                                              abs=1e-6)


# sha256 (first 16 hex digits) of the sorted "key:shape:dtype" lines of CTClassifierModule.state_dict(), recorded
# from the module as it was before the heads (ctplatform.train.heads) and the stage metrics: checkpoints written
# then must keep loading.
OLD_CHECKPOINT_LAYOUTS = {
    "slice-bce-cbam-multiscale": (dict(loss_type="bce", use_attention="cbam", use_multiscale=True), [2.0] * 18,
                                  "77a7c10ab97fec26"),
    "slice-focal-se": (dict(use_attention="se"), None, "3aa6002a3a452f03"),
    "mil-per-class-asl": (dict(head="attention-mil", loss_type="asl"), None, "68e507bc3f1b2f82"),
    "mil-shared-frozen-bce": (dict(head="attention-mil", mil_pooling="shared", mil_frozen_encoder=True,
                                   loss_type="bce"), [1.0] * 18, "8ffcf551ce16d32c"),
}


def state_layout(state: dict) -> str:
    import hashlib

    lines = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def old_module_state(cfg: TrainConfig, pos_weight: list[float] | None) -> dict:
    """A state dict laid out as the old module saved it (the plain model under `model.`, BCE weights under `loss.`)
    with seeded random values."""
    from ctplatform.model.classifier import build_classifier
    from ctplatform.model.mil import build_mil_model

    common = dict(use_attention=cfg.use_attention, use_multiscale=cfg.use_multiscale)
    model = (build_mil_model(cfg.model, mil_pooling=cfg.mil_pooling, mil_hidden=cfg.mil_hidden, **common)
             if cfg.head == "attention-mil" else build_classifier(cfg.model, **common))
    generator = torch.Generator().manual_seed(0)
    state = {f"model.{k}": torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 7
             for k, v in model.state_dict().items()}
    if pos_weight is not None:
        state["loss.pos_weight"] = torch.tensor(pos_weight)
    return state


@pytest.mark.parametrize("case", sorted(OLD_CHECKPOINT_LAYOUTS))
def test_checkpoints_written_before_the_heads_still_load(case, tmp_path):
    changes, pos_weight, layout = OLD_CHECKPOINT_LAYOUTS[case]
    cfg = TrainConfig(model="efficientnet_b0", **changes).validate()
    old_state = old_module_state(cfg, pos_weight)
    assert state_layout(old_state) == layout  # the fixture is what the old module saved
    module = CTClassifierModule(cfg.to_dict(), pos_weight=pos_weight)
    assert state_layout(module.state_dict()) == layout  # no metric state or head object in the checkpoint
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old_state, "pytorch-lightning_version": pl.__version__, "epoch": 3,
                "hyper_parameters": {"config": cfg.to_dict(), "pos_weight": pos_weight, "preprocess": None}}, path)
    loaded = CTClassifierModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    new_state = loaded.state_dict()
    assert new_state.keys() == old_state.keys()
    for key, value in old_state.items():
        assert torch.equal(new_state[key], value), key


def test_heads_are_chosen_by_name():
    from ctplatform.config.model import HEADS as CONFIG_HEADS
    from ctplatform.model.classifier import SliceClassifier
    from ctplatform.model.mil import AttentionMILClassifier
    from ctplatform.train.heads import HEADS, AttentionMILHead, SliceHead, build_head

    assert tuple(HEADS) == CONFIG_HEADS  # every --head choice has a head, and no other
    slice_head = build_head(TrainConfig(model="efficientnet_b0"))
    mil_head = build_head(TrainConfig(model="efficientnet_b0", head="attention-mil"))
    assert isinstance(slice_head, SliceHead) and isinstance(slice_head.build_model(), SliceClassifier)
    assert isinstance(mil_head, AttentionMILHead) and isinstance(mil_head.build_model(), AttentionMILClassifier)
    assert not mil_head.encoder_fixed
    assert build_head(TrainConfig(head="attention-mil", mil_frozen_encoder=True)).encoder_fixed
    with pytest.raises(ValueError, match="unknown head 'transformer': choose one of slice, attention-mil"):
        build_head(TrainConfig(head="transformer"))


def test_validation_scores_drop_padding_duplicates_and_aggregate_slices():
    """Items seen twice (DistributedSampler pads ranks with repeats) count once; slices aggregate per volume with
    the configured aggregation; F1 decides at p >= 0.5."""
    from ctplatform.evaluation.aggregate import aggregate_slices
    from ctplatform.train.stage_metrics import ValidationScores

    probs = torch.tensor([[0.2, 0.4], [0.6, 0.1], [0.5, 0.3], [0.1, 0.8], [0.3, 0.2]])
    logits = torch.logit(probs)  # the metric takes the model's logits
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    volumes, items = torch.tensor([5, 5, 5, 2, 2]), torch.arange(5)
    metric = ValidationScores("max", slice_level=True, class_names=["a", "b"])
    metric.update(logits[:3], targets[:3], volumes[:3], items[:3])
    metric.update(logits[2:], targets[2:], volumes[2:], items[2:])  # item 2 again
    ids, volume_probs, volume_targets = metric.volume_probabilities()
    assert ids.tolist() == [2, 5]
    np.testing.assert_allclose(volume_probs, [aggregate_slices(probs[3:].numpy(), "max"),
                                              aggregate_slices(probs[:3].numpy(), "max")], rtol=1e-6)
    np.testing.assert_array_equal(volume_targets, [[0, 1], [1, 0]])
    scores = metric.compute()
    assert scores["volume_auroc"] == pytest.approx(1.0) and scores["volume_f1/a"] == pytest.approx(1.0)
    assert scores["slice_f1"] == pytest.approx(np.mean([4 / 5, 2 / 3]))  # p = 0.5 is a positive decision
    with pytest.raises(ValueError, match="more than one item"):
        volume_metric = ValidationScores(None)
        volume_metric.update(logits[:2], targets[:2], volumes[:2], items[:2])
        volume_metric.volume_probabilities()
