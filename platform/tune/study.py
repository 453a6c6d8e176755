"""The sweep's Optuna study as Ray Tune's searcher (seeded TPE: multivariate, group, constant liar; or random).

Tune saves the searcher with its experiment state every few seconds and restores it on `--resume`; the searcher
names Optuna trials by their id in the study's SQLite file. A driver that resumes with a study older than that
snapshot (on another machine: the study as last mirrored to the bucket, `tune/mirror.py`) would miss trials the
searcher knows, and Optuna fails the sweep with "Record does not exist". So the searcher's saved state carries a
copy of the study taken at the same moment, and a restore puts it in place whenever the study at hand lacks a trial
the searcher knows. The study is always opened in this machine's workspace (`layout.workspace_folder`), never at
the path the saving driver used, and pickling the searcher carries no open database.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import optuna
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ctplatform.config.tune import TuneConfig
from ctplatform.tune.layout import STUDY_FILE, workspace_folder
from ctplatform.tune.space import SearchSpace

SEARCHERS = ("optuna", "random")


def copy_database(source: Path, target: Path) -> Path:
    """A consistent copy of an SQLite file that may be in use (SQLite's online backup), never a torn one."""
    origin, copy = sqlite3.connect(source), sqlite3.connect(target)
    try:
        origin.backup(copy)
    finally:
        copy.close()
        origin.close()
    return target


def _open_storage(database: Path) -> optuna.storages.RDBStorage:
    database.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{database}")


def _holds(database: Path, study_name: str, trial_ids: Iterable[int]) -> bool:
    """Whether the study in `database` exists and has every one of these trials."""
    if not database.is_file():
        return False
    study_storage = _open_storage(database)
    try:
        study_storage.get_study_id_from_name(study_name)
        for trial_id in trial_ids:
            study_storage.get_trial(trial_id)
        return True
    except KeyError:
        return False
    finally:
        study_storage.engine.dispose()


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose study, in the sweep's workspace, is never older than the searcher's restored state, and
    which accepts replayed results of trials its study already finished.

    A driver killed right after a trial finished leaves the study (written at once) ahead of Tune's experiment
    snapshot: the resumed sweep restarts that trial, which replays its recorded reports (`sweep.run_trial`). Those
    intermediate values are already in the study; Optuna refuses to update a finished trial, which must not fail
    the sweep."""

    def __init__(self, settings: TuneConfig, **kwargs):
        self._sweep_settings = settings
        super().__init__(study_name=settings.name, storage=_open_storage(self._database()), **kwargs)

    def _database(self) -> Path:
        return Path(workspace_folder(self._sweep_settings)) / STUDY_FILE

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError), warnings.catch_warnings():
            # a replayed report of a step the study holds: expected after a resume, not worth a warning
            warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=\d+` is "
                                                      "already reported", category=UserWarning)
            super().on_trial_result(trial_id, result)

    def __getstate__(self) -> dict:
        state = {key: value for key, value in self.__dict__.items() if key not in ("_ot_study", "_storage")}
        state["_ot_trials"] = {tune_id: trial._trial_id for tune_id, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        trial_ids, study_copy = state.pop("_ot_trials"), state.pop("_study_copy", None)
        self.__dict__.update(state)
        database = self._database()
        if study_copy is not None and not _holds(database, self._study_name, trial_ids.values()):
            database.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                saved = Path(tmp) / STUDY_FILE
                saved.write_bytes(study_copy)
                copy_database(saved, database)
        self._storage = _open_storage(database)
        self._setup_study(self._mode)  # OptunaSearch's own: loads the study (or creates it, before any trial)
        self._ot_trials = {tune_id: optuna.trial.Trial(self._ot_study, trial_id)
                           for tune_id, trial_id in trial_ids.items()}

    def save(self, checkpoint_path: str) -> None:
        state = self.__getstate__()
        with tempfile.TemporaryDirectory() as tmp:
            state["_study_copy"] = copy_database(self._database(), Path(tmp) / STUDY_FILE).read_bytes()
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(state, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__setstate__(pickle.load(handle))


def build_searcher(space: SearchSpace, settings: TuneConfig, max_concurrent: int) -> ConcurrencyLimiter:
    """The sweep's searcher by name (`settings.searcher`), at most `max_concurrent` trials at a time."""
    if settings.searcher == "optuna":
        with warnings.catch_warnings():  # `group` and `constant_liar` are experimental in Optuna: used knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=True,
                                                 constant_liar=True)
    elif settings.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        raise ValueError(f"invalid searcher {settings.searcher!r}: choose one of {', '.join(SEARCHERS)}")
    searcher = ResumableOptunaSearch(settings, space=space.define_by_run, metric=space.metric, mode=space.mode,
                                     sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
