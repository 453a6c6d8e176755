"""Where a sweep's files are. Layout of a sweep folder (`<storage>/<name>`):

    optuna.db            the Optuna study (SQLite; `optuna-dashboard sqlite:///.../optuna.db` opens it)
    trials/trial_<id>/   each trial's Train run: Ray checkpoints, TensorBoard logs, its reports (`HISTORY_FILE`)
    trials.csv           all trials (config, metric, epochs, state), rewritten as results arrive
    summary/             trials.csv + optimisation history, parameter importances, parallel coordinates (PNG)
    best/                the best trial's best epoch as a model bundle, with its evaluation report
"""

from __future__ import annotations

from pathlib import Path

from ctplatform import storage
from ctplatform.config.tune import TuneConfig

HISTORY_FILE = "tune_reports.jsonl"  # in a trial's run folder: every report it made, replayed by a restarted trial
COMPLETE_FILE = "trial_complete"  # in a trial's run folder: its training finished
STUDY_FILE = "optuna.db"


def sweep_folder(settings: TuneConfig) -> str:
    location = settings.storage_path
    if storage.is_uri(location):
        return location.rstrip("/") + "/" + settings.name
    return str(Path(location).resolve() / settings.name)


def workspace_folder(settings: TuneConfig) -> str:
    """Where the driver writes the study, the trials table, the summary and the best bundle: the sweep folder,
    or a node-local folder when storage is an object-store URI (mirrored to `<uri>/<name>` as the sweep goes, and
    fetched back from there by `--resume` on a driver that lacks it)."""
    if storage.is_uri(settings.storage_path):
        return str(storage.local_work_dir("sweeps", settings.storage_path, settings.name))
    return sweep_folder(settings)
