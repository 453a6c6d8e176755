"""A sweep never waits forever for Train workers: trials are capped to what the cluster holds, a trial that can
never fit a fixed cluster is refused before anything starts, and a worker group that cannot start fails its trial
after bounded retries (one line in the sweep summary) while the sweep goes on."""

import pytest
import ray
import yaml

from ctplatform.config import TrainConfig
from ctplatform.config.tune import TuneConfig
from ctplatform.tune.resources import trial_demand, trials_that_fit
from ctplatform.tune.space import load_space
from ctplatform.tune.sweep import run_sweep

SPACE = {"metric": "val_loss", "mode": "min",
         "params": {"learning_rate": {"type": "categorical", "choices": [0.003, 1.0e-4]}}}


def test_trial_demand_and_how_many_fit():
    demand = trial_demand({"CPU": 0.1}, workers=2, cpus_per_worker=1.0, gpus_per_worker=0.5, use_gpu=True)
    assert demand == pytest.approx({"CPU": 2.1, "GPU": 1.0})
    assert trials_that_fit(demand, {"CPU": 8.0, "GPU": 2.0}) == 2  # GPUs bound it
    assert trials_that_fit(demand, {"CPU": 4.0, "GPU": 8.0}) == 1  # CPUs bound it: 2 x 2.1 > 4
    assert trials_that_fit(demand, {"CPU": 2.0, "GPU": 8.0}) == 0
    assert trials_that_fit({"CPU": 0.1, "sweep_driver": 1.0}, {"CPU": 4.0}) == 0  # a resource no node advertises
    assert "GPU" not in trial_demand({"CPU": 0.1}, 1, 1.0, 1.0, use_gpu=False)


def _base(cache) -> TrainConfig:
    return TrainConfig(slice_dir=str(cache), model="resnet50", batch_size=16, epochs=1, num_workers=0,
                       use_gpu=False, limit_train_batches=2, seed=0).validate()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_trial_that_cannot_fit_a_fixed_cluster_is_refused_at_once(tiny_cache, tmp_path):
    """Before, such a sweep waited forever: Ray Train's controller timed out starting the worker group and retried
    without end (the hang this guards against fails this test by its timeout instead)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        settings = TuneConfig(name="big", storage_path=str(tmp_path / "runs"), num_samples=2, cpus_per_worker=2)
        with pytest.raises(ValueError, match=r"one trial needs 2.1 CPU .* the cluster has 1 CPU"):
            run_sweep(_base(tiny_cache), load_space(space), settings)
    finally:
        ray.shutdown()
    assert not (tmp_path / "runs" / "big" / "trials").exists()  # no trial started


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_group_that_cannot_start_fails_its_trial_after_bounded_retries(tiny_cache, tmp_path, capsys):
    """On a cluster that may grow (an address is given) the sweep starts; each trial's workers never get their
    CPUs here, so Ray Train's controller gives up after its bounded retries, the trial fails with one line saying
    why, and the sweep goes on to the next trial and ends."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"}})
    try:
        settings = TuneConfig(name="wait", storage_path=str(tmp_path / "runs"), num_samples=2, cpus_per_worker=2,
                              max_failures=0, address="auto", scheduler="fifo")
        summary = run_sweep(_base(tiny_cache), load_space(space), settings, export_best=False)
    finally:
        ray.shutdown()
    assert summary["trials"] == 2 and summary["errors"] == 2
    out = capsys.readouterr()
    failed = [line for line in out.out.splitlines() if line.startswith("trial ") and " failed: " in line]
    assert len(failed) == 2, out.out[-3000:]
    for line in failed:  # what the trial waited for, and what a trial holds against what the cluster has
        assert "worker group startup timed out" in line and "waiting for 1 workers" in line, line
        assert "a trial holds 2.1 CPU; the cluster has 1 CPU" in line and "Traceback" not in line, line
    assert "the autoscaler" in out.err  # the sweep said up front that a trial does not fit the cluster as it is


def test_retry_backoff_doubles_up_to_its_cap():
    from ctplatform.train.ray_launcher import RetryBackoff

    backoff = RetryBackoff(first_s=2.0, max_s=30.0)
    assert [backoff.delay_s(retry) for retry in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_worker_group_that_cannot_start_is_retried_with_backoff_then_fails(tiny_cache, tmp_path, capfd):
    """A plain training run whose worker cannot get its CPUs: Ray Train's controller waits 2 s, then 4 s, before its
    two retries (each said in the log), then the run fails with the startup timeout; it never loops forever."""
    import time

    from ctplatform.train.ray_launcher import CONTROLLER_RETRIES, build_torch_trainer, resolved

    start_timeout_s = 3
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(start_timeout_s)}})
    try:
        cfg = resolved(_base(tiny_cache).replace(cpus_per_worker=2, max_failures=0, run_name="wait",
                                                 storage_path=str(tmp_path / "runs")))
        started = time.monotonic()
        result = build_torch_trainer(cfg, progress_bar=False).fit()
        elapsed = time.monotonic() - started
    except Exception as error:  # Ray Train 2.60 raises the run's error from fit()
        elapsed = time.monotonic() - started
        result = error
    finally:
        time.sleep(2)  # the controller's log lines reach the driver asynchronously
        ray.shutdown()
    assert "worker group startup timed out" in str(getattr(result, "error", result))
    log = capfd.readouterr().err
    assert "worker group retry 1: starting it again in 2 s" in log, log[-3000:]
    assert "worker group retry 2: starting it again in 4 s" in log, log[-3000:]
    assert "worker group retry 3" not in log  # bounded: CONTROLLER_RETRIES retries, then the run fails
    assert CONTROLLER_RETRIES == 2
    assert elapsed >= (CONTROLLER_RETRIES + 1) * start_timeout_s + 2 + 4


def test_a_finished_trial_is_one_line_with_its_settings_and_best_value(tmp_path, capsys):
    from types import SimpleNamespace

    from ctplatform.tune.summary import LiveTrialsTable

    space = load_space()
    table = LiveTrialsTable(tmp_path / "trials.csv", space, max_epochs=3)
    trial = SimpleNamespace(trial_id="abc123", config={"loss_type": "focal", "learning_rate": 0.00031234, "x": 1})
    for epoch, value in ((1, 0.61), (2, 0.67), (3, 0.64)):
        table.on_trial_result(0, [], trial, {space.metric: value, "training_iteration": epoch})
    table.on_trial_complete(0, [], trial)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"trial abc123 finished after 3 epoch(s): best {space.metric} 0.6700  (loss_type=focal, "
                     "learning_rate=0.000312)"]
    assert "abc123" in (tmp_path / "trials.csv").read_text()
