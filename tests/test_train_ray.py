"""Training through Ray Train on a real local Ray: DDP on 2 CPU workers, resume by run name, worker failure."""

import os
import time
from pathlib import Path

import pytest
import ray

from ctplatform.config import TrainConfig
from ctplatform.train.ray_launcher import build_torch_trainer, resolved, run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(cache, storage, **changes) -> TrainConfig:
    # resnet50: a randomly initialised efficientnet_b0 gives constant outputs in eval mode after a few steps (its
    # BatchNorm running statistics have not adapted yet), which would make the metric comparison below vacuous.
    values = dict(slice_dir=str(cache), storage_path=str(storage), model="resnet50", batch_size=16,
                  epochs=2, num_workers=0, learning_rate=1e-3, use_gpu=False, limit_train_batches=4, seed=0)
    values.update(changes)
    return TrainConfig(**values).validate()


def test_ddp_of_two_workers_averages_gradients_and_matches_one_worker(local_ray, tiny_cache, tmp_path):
    """One run per world size. A single worker trains its LightningModule unwrapped (DDP would only copy gradients
    to average them with nobody); two workers get DistributedDataParallel with gradient bucket views, and their
    gradients are averaged: after each step on different batches both replicas hold bit-identical weights. With the
    same data and global batch (1 x 16 = 2 x 8), the two runs agree within tolerance, and the 2-worker validation
    covers every validation slice exactly once (gathered, DistributedSampler padding removed): its volume AUROC
    equals an offline evaluation of the same checkpoint."""
    import torch

    from ctplatform.evaluation.evaluate import predict_split
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.ray_launcher import best_lightning_checkpoint, local_run_dir
    from ctplatform.train.stage_metrics import multilabel_scores

    seen = tmp_path / "wrappers"

    def digest(module) -> str:
        return repr(sum(float(p.detach().double().sum()) for p in module.parameters()))

    class RecordWrapper(pl.Callback):
        def on_train_start(self, trainer, module):
            with open(tmp_path / "initial", "a") as handle:
                handle.write(f"{trainer.world_size} {digest(module)}\n")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            model = trainer.strategy.model
            views = getattr(model, "gradient_as_bucket_view", None)
            with open(seen, "a") as handle:
                handle.write(f"{trainer.world_size} {type(model).__name__} {views}\n")
            if trainer.world_size == 2:
                with open(tmp_path / "trained", "a") as handle:
                    handle.write(f"{trainer.global_rank} {batch_idx} {digest(module)}\n")

    results = {}
    for workers, batch_size in ((1, 16), (2, 8)):
        cfg = resolved(config(tiny_cache, tmp_path, run_name=f"world{workers}", epochs=1, ray_workers=workers,
                              batch_size=batch_size, limit_train_batches=4))
        result = build_torch_trainer(cfg, worker_callbacks=[RecordWrapper()], progress_bar=False).fit()
        assert result.error is None
        results[workers] = (result, cfg)
    assert sorted(set(seen.read_text().splitlines())) == [
        "1 CTClassifierModule None", "2 DistributedDataParallel True"]
    trained: dict[str, dict[str, str]] = {}
    for line in (tmp_path / "trained").read_text().splitlines():
        rank, step, value = line.split()
        trained.setdefault(step, {})[rank] = value
    assert sorted(trained) == ["0", "1", "2", "3"]
    assert all(sorted(ranks) == ["0", "1"] and ranks["0"] == ranks["1"] for ranks in trained.values()), trained
    initial = {line.split()[1] for line in (tmp_path / "initial").read_text().splitlines() if line.startswith("2 ")}
    assert len(initial) == 1 and trained["0"]["0"] not in initial  # same start, a step was taken

    one, two = (results[w][0].metrics for w in (1, 2))
    assert abs(one["val_loss"] - two["val_loss"]) < 0.25 * one["val_loss"]
    result, cfg = results[2]
    checkpoint = best_lightning_checkpoint(result, local_run_dir(cfg))
    split = predict_split(Predictor.from_path(checkpoint, device="cpu"), tiny_cache)
    assert split["probs"].std(axis=0).max() > 1e-4, "the model's outputs are constant: nothing to compare"
    offline = multilabel_scores(torch.from_numpy(split["probs"]).float(), torch.from_numpy(split["y_true"]).float())
    assert two["val/volume_auroc"] == pytest.approx(offline["auroc"], abs=2e-3)


def test_rerun_resumes_and_more_epochs_continue(local_ray, tiny_cache, tmp_path):
    first = run_training(config(tiny_cache, tmp_path, epochs=1))
    assert first.metrics["epoch"] == 0
    again = run_training(config(tiny_cache, tmp_path, epochs=2))  # same run name: resumes after epoch 0
    assert again.run_name == first.run_name and again.metrics["epoch"] == 1
    versions = list((Path(again.run_dir) / "logs" / "multi_abnormality_classification").iterdir())
    assert len(versions) == 2  # one TensorBoard version per process start, one run


def test_worker_killed_mid_epoch_resumes_from_checkpoint(local_ray, tiny_cache, tmp_path):
    from ray.train import UserCallback

    from ctplatform.train.lightning_import import pl

    marker = tmp_path / "killed-once"
    epochs_started = tmp_path / "epochs-started"

    class KillOnceMidEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            with open(epochs_started, "a") as handle:
                handle.write(f"{trainer.current_epoch}\n")

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2 and not marker.exists():
                # Die only once Ray Train's controller has taken the epoch-0 report with its checkpoint (the run
                # callback below, which runs there, has seen it): a worker lost before that restarts from scratch.
                deadline = time.time() + 120
                while time.time() < deadline and not registered.exists():
                    time.sleep(0.2)
                marker.write_text("killed")
                os.kill(os.getpid(), 9)  # the worker process dies mid-epoch, as on a lost node

    class RecordCheckpointReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                registered.write_text("checkpoint reported")

    registered = tmp_path / "checkpoint-reported"
    cfg = resolved(config(tiny_cache, tmp_path, epochs=3, max_failures=2))
    result = build_torch_trainer(cfg, worker_callbacks=[KillOnceMidEpoch()], run_callbacks=[RecordCheckpointReports()],
                                 progress_bar=False).fit()
    assert marker.exists() and result.error is None
    started = [int(x) for x in epochs_started.read_text().split()]
    # epoch 0 finished and was checkpointed; epoch 1 died, restarted from that checkpoint, then 1 and 2 ran
    assert started == [0, 1, 1, 2]
    assert result.metrics["epoch"] == 2


def test_attention_mil_trains_exports_a_bundle_and_predicts_with_attention(local_ray, tiny_cache, tiny_dataset,
                                                                          tmp_path):
    import json

    import numpy as np

    from ctplatform.evaluation.evaluate import evaluate
    from ctplatform.evaluation.predict_files import predict_files
    from ctplatform.model.bundle import load_bundle
    from ctplatform.model.mil import AttentionMILClassifier

    # 16 slices per step: bags of 8 cached slices -> 2 volumes per batch
    outcome = run_training(config(tiny_cache, tmp_path, head="attention-mil", mil_pooling="shared", epochs=1,
                                  limit_train_batches=3))
    assert outcome.run_name.startswith("resnet50-attention-mil-")
    assert "val/volume_auroc" in outcome.metrics and "val/slice_auroc" not in outcome.metrics
    bundle = tmp_path / "bundle"
    metrics = evaluate(outcome.best_checkpoint, tiny_cache, tmp_path / "report", bundle_dir=bundle, device="cpu")
    assert metrics["macro"]["auroc"] is not None
    model, spec = load_bundle(bundle)
    assert isinstance(model, AttentionMILClassifier)
    assert spec.architecture["head"] == "attention-mil" and spec.architecture["mil_pooling"] == "shared"
    volume = sorted(tiny_dataset.rglob("*.nii.gz"))[0]
    table = predict_files(str(bundle), [str(volume)], "volumes", output=str(tmp_path / "pred.csv"), device="cpu")
    assert table.shape == (1, 19)
    record = json.loads((tmp_path / "pred.json").read_text())[0]
    weights = np.array(list(record["slice_attention"].values()))  # (classes, slices)
    assert weights.shape == (18, len(record["slice_positions"]))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(weights, weights[:1].repeat(18, axis=0))  # shared pooling: one distribution
