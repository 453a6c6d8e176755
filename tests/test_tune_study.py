"""The sweep's searcher across a driver's death: its saved state and the study it restores with agree.

No Ray cluster: the searcher is driven as Tune drives it (suggest, results, completion, `save_to_dir` with the
experiment state, `restore_from_dir` on `--resume`). The scenario is the one a bucket sweep meets: Tune's snapshot
of the searcher is newer than the study last mirrored to the bucket (a trial suggested after the mirror)."""

import shutil

import optuna
import pytest

from ctplatform.config.tune import TuneConfig
from ctplatform.tune.layout import STUDY_FILE, workspace_folder
from ctplatform.tune.space import SearchSpace
from ctplatform.tune.study import build_searcher, copy_database

pytestmark = pytest.mark.timeout(60)

SPACE = SearchSpace(metric="val_loss", mode="min",
                    params={"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                            "loss_type": {"type": "categorical", "choices": ["bce", "focal"]}})


def _searcher(settings):
    return build_searcher(SPACE, settings, max_concurrent=3).searcher


def _report(searcher, trial_id, losses):
    for epoch, loss in enumerate(losses, start=1):
        searcher.on_trial_result(trial_id, {"val_loss": loss, "training_iteration": epoch})
    searcher.on_trial_complete(trial_id, {"val_loss": min(losses), "training_iteration": len(losses)})


@pytest.mark.parametrize("where", ["same machine", "another machine"])
def test_resume_with_a_study_older_than_the_searchers_snapshot(tmp_path, monkeypatch, where):
    settings = TuneConfig(name="k", storage_path="s3://bucket-of-sweeps/runs", seed=3)
    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "machine-a"))
    first = _searcher(settings)
    configs = {trial_id: first.suggest(trial_id) for trial_id in ("t1", "t2")}
    _report(first, "t1", [0.7, 0.5])
    first.on_trial_result("t2", {"val_loss": 0.9, "training_iteration": 1})
    database_a = first._database()
    assert database_a.is_relative_to(tmp_path / "machine-a")
    mirrored = copy_database(database_a, tmp_path / "mirrored.db")  # what StudyMirror uploaded when t1 ended
    configs["t3"] = first.suggest("t3")  # after the mirror: only Tune's snapshot of the searcher knows t3
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    first.save_to_dir(str(experiment), session_str="s")  # Tune's experiment snapshot; then the driver dies

    if where == "another machine":  # its workspace is gone; this one has the mirrored study only
        shutil.rmtree(tmp_path / "machine-a")
        monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "machine-b"))
    machine = "machine-b" if where == "another machine" else "machine-a"
    database = tmp_path / machine / database_a.relative_to(tmp_path / "machine-a")
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mirrored, database)  # run_sweep's --resume fetch of the mirror (or a study that old)

    resumed = _searcher(settings)
    resumed.restore_from_dir(str(experiment))
    assert resumed._database() == database
    _report(resumed, "t3", [0.6, 0.4])  # a trial the mirrored study lacks: "Record does not exist" before
    resumed.on_trial_result("t2", {"val_loss": 0.8, "training_iteration": 2})
    resumed.on_trial_complete("t2", {"val_loss": 0.8, "training_iteration": 2})
    assert resumed.suggest("t4")  # a new trial after the resume
    _report(resumed, "t4", [0.3])

    study = optuna.load_study(study_name="k", storage=f"sqlite:///{database}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    # the trials keep the settings Tune trained them with, and every reported epoch
    assert [t.params for t in trials[:3]] == [configs["t1"], configs["t2"], configs["t3"]]
    assert [dict(t.intermediate_values) for t in trials] == [{1: 0.7, 2: 0.5}, {1: 0.9, 2: 0.8},
                                                             {1: 0.6, 2: 0.4}, {1: 0.3}]
    assert study.best_value == pytest.approx(0.3)
    if where == "another machine":
        assert not (tmp_path / "machine-a").exists()  # nothing was written at the saving driver's path


def test_a_study_ahead_of_the_snapshot_is_kept(tmp_path, monkeypatch):
    """The driver died after a trial finished but before Tune's next snapshot: the study (written at once) is
    newer than the searcher's saved copy and is kept; the trial, restarted by Tune, replays its reports."""
    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "node"))
    settings = TuneConfig(name="k", storage_path="s3://bucket-of-sweeps/runs", seed=0)
    first = _searcher(settings)
    first.suggest("t1")
    first.on_trial_result("t1", {"val_loss": 0.7, "training_iteration": 1})
    first.save_to_dir(str(tmp_path), session_str="s")
    first.on_trial_result("t1", {"val_loss": 0.5, "training_iteration": 2})
    first.on_trial_complete("t1", {"val_loss": 0.5, "training_iteration": 2})

    resumed = _searcher(settings)
    resumed.restore_from_dir(str(tmp_path))
    resumed.on_trial_result("t1", {"val_loss": 0.7, "training_iteration": 1})  # replayed: already in the study
    resumed.on_trial_result("t1", {"val_loss": 0.5, "training_iteration": 2})
    resumed.on_trial_complete("t1", {"val_loss": 0.5, "training_iteration": 2})
    (trial,) = optuna.load_study(study_name="k", storage=f"sqlite:///{resumed._database()}").get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    assert dict(trial.intermediate_values) == {1: 0.7, 2: 0.5}
    assert (resumed._database().parent / STUDY_FILE) == resumed._database()
    assert str(resumed._database().parent) == workspace_folder(settings)
