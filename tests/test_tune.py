"""Sweeps on a real local Ray: Optuna records trials, ASHA stops some, the best epoch is exported; resumable."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml

from ctplatform.config import TrainConfig
from ctplatform.config.tune import TuneConfig
from ctplatform.evaluation.predictor import Predictor
from ctplatform.tune.space import load_space
from ctplatform.tune.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Two learning rates far apart: a trial at 1e-7 barely moves val_loss, one at 3e-3 lowers it; ASHA (rf 2) stops a
# trial that reaches a rung worse than the median of those recorded there before it.
SPACE = {"metric": "val_loss", "mode": "min",
         "params": {"learning_rate": {"type": "categorical", "choices": [0.003, 1.0e-7]},
                    "use_attention": {"type": "categorical", "choices": ["none", "se"]}}}


def base_config(cache, **changes) -> TrainConfig:
    # timm's resnet10t: every epoch of every trial writes a checkpoint, 60 MB rather than resnet50's 290 MB
    values = dict(slice_dir=str(cache), model="resnet10t", batch_size=16, epochs=3, num_workers=0, use_gpu=False,
                  limit_train_batches=3, seed=0)
    values.update(changes)
    return TrainConfig(**values).validate()


@pytest.fixture()
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def test_space_file_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": {"not_a_setting": {"type": "float", "low": 0, "high": 1}}}))
    with pytest.raises(ValueError, match="not a training setting"):
        load_space(bad)
    default = load_space()
    assert default.metric == "val/volume_auroc" and default.params["focal_alpha"]["when"] == {"loss_type": ["focal"]}


def test_sweep_optuna_asha_fault_tolerance_and_best_epoch_bundle(tiny_cache, tmp_path, space_file):
    from ctplatform.train.lightning_import import pl

    marker = tmp_path / "killed-once"
    starts = tmp_path / "epoch-starts"

    class KillFirstTrialOnce(pl.Callback):
        """The first trial's Train worker dies mid-epoch 1, once, as on a lost node."""

        def on_train_epoch_start(self, trainer, module):
            with open(starts, "a") as handle:
                handle.write(f"{os.environ.get('TUNE_TRIAL_ID', '?')} {trainer.current_epoch}\n")

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1 and not marker.exists():
                # Die only once Ray Train's controller has registered the epoch-0 checkpoint (the sweep's report
                # callback, which runs there, has recorded it): a worker lost before that restarts from scratch.
                deadline = time.time() + 120
                while time.time() < deadline and not any(
                        "checkpoint_path" in history.read_text()
                        for history in (tmp_path / "runs").glob("s/trials/*/tune_reports.jsonl")):
                    time.sleep(0.2)
                marker.write_text("killed")
                os.kill(os.getpid(), 9)

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        settings = TuneConfig(name="s", storage_path=str(tmp_path / "runs"), num_samples=3, seed=0,
                                 cpus_per_worker=1)
        summary = run_sweep(base_config(tiny_cache), load_space(space_file), settings,
                            worker_callbacks=[KillFirstTrialOnce()])
    finally:
        ray.shutdown()
    sweep = Path(summary["sweep_dir"])
    # Optuna's study (SQLite in the sweep folder) recorded every finished trial
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    # ASHA stopped at least one trial before its last epoch, and the next trials still got the 2 CPUs
    trials = pd.read_csv(sweep / "summary" / "trials.csv")
    assert len(trials) == 3 and (trials["state"] == "stopped early").sum() >= 1 and summary["errors"] == 0
    # trials keep only Ray's checkpoints (the top-3 + last.ckpt Lightning copies would double the disk a sweep takes)
    ray_checkpoints = sorted((sweep / "trials").glob("trial_*/checkpoint_*/*.ckpt"))
    assert ray_checkpoints and sorted((sweep / "trials").rglob("*.ckpt")) == ray_checkpoints
    # the killed worker's trial resumed from its epoch-0 checkpoint: epoch 1 started twice, epoch 0 once
    assert marker.exists()
    lines = [line.split()[1] for line in starts.read_text().splitlines()]
    assert lines[:3] == ["0", "1", "1"]
    # the exported bundle is the best epoch of the best trial (lowest val_loss over all reported epochs)
    best_value = trials["best_val_loss"].min()
    assert summary["best_val_loss"] == pytest.approx(best_value)
    bundle = Path(summary["best_bundle"])
    predictor = Predictor.from_path(bundle, device="cpu")
    assert predictor.spec.source["checkpoint"].startswith(summary["best_checkpoint"])
    assert predictor.spec.calibration is not None
    slices = np.load(sorted((tiny_cache / "volumes" / "valid").glob("*.npy"))[0])
    assert predictor.predict_prepared(slices).probabilities.shape == (18,)
    for plot in ("optimization_history.png", "parallel_coordinates.png"):
        assert (sweep / "summary" / plot).is_file()
    # every trial's checkpoint kept its validation predictions: each is tested against the best trial's
    marks = pd.read_csv(sweep / "summary" / "trials.csv", keep_default_na=False)["tied_with_best"]
    assert sorted(marks)[0] == "best" and set(marks) <= {"best", "yes", "no"} and (marks == "best").sum() == 1
    assert summary["tied_with_best"] == trials.loc[marks == "yes", "trial_id"].tolist()
    report = json.loads((bundle / "report" / "metrics.json").read_text())
    assert report["confidence_intervals"]["resamples"] == 1000


def test_sweep_on_a_bucket_driver_killed_then_resumed_elsewhere_runs_each_trial_once(tiny_cache, tmp_path, space_file,
                                                                                      monkeypatch, s3_bucket):
    """Every path a bucket on the S3-protocol test server. The `ctplatform tune` driver is killed (with the local
    Ray it started) once a trial has finished, and resumed by a driver whose node-local workspace lacks the study
    (as on another machine): it fetches the study as mirrored when that trial ended, trains only the unfinished
    trials, and exports the best epoch to the bucket. Trials read the cache through the node-local copy; nothing is
    written to the working directory."""
    from ctplatform import storage
    from ctplatform.serve.bundles import chosen_bundle
    from ctplatform.tune.layout import HISTORY_FILE, workspace_folder

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(home))  # the drivers and the Ray workers they start inherit it
    storage.upload(tiny_cache, f"{s3_bucket}/cache")
    exe = str(Path(sys.executable).with_name("ctplatform"))
    # timm's resnet10t: a checkpoint of 60 MB rather than resnet50's 290 MB, uploaded each epoch to the test server
    command = [exe, "tune", "--slice-dir", f"{s3_bucket}/cache", "--model", "resnet10t", "--batch-size", "16",
               "--epochs", "2", "--num-workers", "0", "--cpu", "--limit-train-batches", "3", "--num-samples", "3",
               "--space", str(space_file), "--storage-path", f"{s3_bucket}/runs", "--name", "k", "--scheduler", "fifo"]
    sweep = f"{s3_bucket}/runs/k"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    deadline = time.time() + 400
    finished = pd.DataFrame()
    while time.time() < deadline and driver.poll() is None:
        if storage.is_file(f"{sweep}/trials.csv"):  # the mirrored table: copied after the study, when a trial ends
            # trial ids are hex: one like "5314810e2" would read as the float 531481000.0
            finished = pd.read_csv(io.BytesIO(storage.read_bytes(f"{sweep}/trials.csv")),
                                   dtype={"trial_id": str}).query("state == 'finished'")
            if len(finished) >= 1:
                break
        time.sleep(1)
    assert len(finished) >= 1, "no trial finished before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)  # the sweep's driver (and the local Ray it started) die at once
    driver.wait()
    workspace = Path(workspace_folder(TuneConfig(name="k", storage_path=f"{s3_bucket}/runs")))
    for name in ("optuna.db", "trials.csv"):  # the resuming driver has only what the bucket holds
        (workspace / name).unlink()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = pd.read_csv(io.BytesIO(storage.read_bytes(f"{sweep}/summary/trials.csv")), dtype={"trial_id": str})
    assert len(trials) == 3 and set(trials["state"]) == {"finished"}
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{workspace / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    for trial_id in finished["trial_id"]:  # a finished trial was not trained again: its two epochs reported once
        history = storage.read_text(f"{sweep}/trials/trial_{trial_id}/{HISTORY_FILE}").splitlines()
        assert len(history) == 2, (trial_id, history)
    files = storage.list_files(sweep)
    # Ray's own checkpoints were written under the URI, and the driver's results mirrored there
    assert [f for f in files if f.startswith("trials/trial_") and f.endswith("/checkpoint.ckpt")]
    for name in ("optuna.db", "trials.csv", "summary/trials.csv", "best/metadata.json", "best/report/report.html"):
        assert name in files, name
    # the trials read the cache through the node-local copy: the same bytes as the cache they came from
    copies = sorted(home.glob("slices/*/volumes/*/*.npy"))  # training saw 3 batches; evaluation every valid volume
    assert {p.name for p in tiny_cache.glob("volumes/valid/*.npy")} <= {p.name for p in copies}
    assert all(p.read_bytes() == (tiny_cache / "volumes" / p.parent.name / p.name).read_bytes() for p in copies)
    # the bundle in the bucket is copied to this node and predicts
    predictor = Predictor.from_path(chosen_bundle(f"{sweep}/best"), device="cpu")
    slices = np.load(sorted((tiny_cache / "volumes" / "valid").glob("*.npy"))[0])
    assert predictor.predict_prepared(slices).probabilities.shape == (18,)
    assert os.listdir(cwd) == []
