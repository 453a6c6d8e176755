"""The driver's results next to Ray's checkpoints when a sweep's storage is an object-store URI.

With a bucket as storage the driver writes its study, trials table, summary and best bundle in a node-local
workspace (`layout.workspace_folder`). The study and the trials table are copied to `<uri>/<name>` each time a
trial ends, so a driver killed mid-sweep can be resumed on another machine (`--resume` fetches them when its own
workspace lacks them); everything is copied when the sweep ends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray.tune import Callback

from ctplatform import storage
from ctplatform.tune.layout import STUDY_FILE
from ctplatform.tune.study import copy_database

MIRRORED = (STUDY_FILE, "trials.csv", "summary", "best")
STUDY_FILES = (STUDY_FILE, "trials.csv")


def mirror_to_uri(workspace: str, uri: str, names: tuple[str, ...] = MIRRORED) -> list[str]:
    """Copy the named files and folders of the driver's workspace to `uri`; returns the locations copied."""
    copied = []
    for name in names:
        source = Path(workspace) / name
        if not source.exists():
            continue
        if name == STUDY_FILE:  # Optuna may be writing it: copy a consistent snapshot, never a torn file
            with tempfile.TemporaryDirectory() as tmp:
                storage.upload(copy_database(source, Path(tmp) / name), storage.join(uri, name))
        else:
            storage.upload(source, storage.join(uri, name))
        copied.append(storage.join(uri, name))
    return copied


class StudyMirror(Callback):
    """Tune callback: the study and the trials table copied to the sweep URI whenever a trial ends (put it after
    the callback that writes `trials.csv`)."""

    def __init__(self, workspace: str, uri: str):
        self.workspace, self.uri = workspace, uri

    def on_trial_complete(self, iteration, trials, trial, **info):
        mirror_to_uri(self.workspace, self.uri, STUDY_FILES)

    def on_trial_error(self, iteration, trials, trial, **info):
        mirror_to_uri(self.workspace, self.uri, STUDY_FILES)
