"""An evaluated run as `ctplatform compare` reads it: its probabilities, labels and patients, from whatever the user
points at.

Accepted: a run folder (``runs/<name>``, whose ``report/`` holds the evaluation), a report folder itself, a bundle
(tune's ``best/`` with its ``report/``, or a run's ``bundle/`` beside ``report/``), or a ``results.json`` /
predictions CSV file. A report folder keeps ``labels.csv`` (the labels it was scored against) and, when a calibration
was applied, ``predictions_uncalibrated.csv`` (the model's own ranking, which the AUROC is taken on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctplatform.evaluation.results import read_labels_table, read_predictions
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN, volume_stem

RESULTS_FILE = "results.json"
LABELS_FILE = "labels.csv"
UNCALIBRATED_FILE = "predictions_uncalibrated.csv"


@dataclass
class EvaluatedRun:
    source: str  # what the user named
    results: Path  # the predictions file read
    class_names: tuple[str, ...]
    names: list[str]  # case keys (volume names without extension), sorted
    probs: np.ndarray  # (N, C) the reported (calibrated) probabilities, in `names` order
    ranking: np.ndarray  # (N, C) the model's own probabilities (AUROC is taken on these)
    labels: np.ndarray | None  # (N, C) from the report's labels.csv, if it has one


def locate_results(path: str | os.PathLike) -> Path:
    """The predictions file a run, report folder, bundle or file stands for; FileNotFoundError saying where it
    looked."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    candidates = [path / RESULTS_FILE, path / "report" / RESULTS_FILE]
    if (path / "metadata.json").is_file():  # a run's bundle/ sits beside its report/
        candidates.append(path.parent / "report" / RESULTS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{path}: no evaluation found (looked for {looked}); evaluate it first "
                            "(ctplatform evaluate writes report/results.json)")


def class_names_of(results: Path) -> tuple[str, ...]:
    """The class names a predictions file carries, in the platform's order where they are its classes."""
    if results.suffix.lower() == ".json":
        with open(results, encoding="utf-8") as handle:
            payload = json.load(handle)
        predictions = payload.get("predictions") if isinstance(payload, dict) else None
        if not predictions or not isinstance(predictions[0], dict) or "probabilities" not in predictions[0]:
            raise ValueError(f"{results}: not a results.json with predictions")
        names = list(predictions[0]["probabilities"])
    else:
        names = [c for c in pd.read_csv(results, nrows=0).columns if c != VOLUME_COLUMN]
    ordered = [c for c in CLASS_NAMES if c in names]
    return tuple(ordered + sorted(c for c in names if c not in CLASS_NAMES))


def _by_case(names: list[str], values: np.ndarray, source: Path) -> dict[str, np.ndarray]:
    keys = [volume_stem(name) for name in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{source}: a case appears more than once")
    return dict(zip(keys, values, strict=True))


def load_run(path: str | os.PathLike) -> EvaluatedRun:
    results = locate_results(path)
    class_names = class_names_of(results)
    names, probs = read_predictions(results, class_names)
    by_case = _by_case(names, probs, results)
    keys = sorted(by_case)
    probs = np.stack([by_case[k] for k in keys])
    ranking = probs
    uncalibrated = results.parent / UNCALIBRATED_FILE
    if uncalibrated.is_file():
        raw = _by_case(*read_predictions(uncalibrated, class_names), uncalibrated)
        if set(raw) == set(keys):
            ranking = np.stack([raw[k] for k in keys])
    labels = None
    labels_file = results.parent / LABELS_FILE
    if labels_file.is_file():
        labels = aligned_labels(labels_file, keys, class_names)
    return EvaluatedRun(str(path), results, class_names, keys, probs, ranking, labels)


def aligned_labels(labels_csv: str | os.PathLike, keys: list[str], class_names: tuple[str, ...]) -> np.ndarray:
    """Labels of the cases `keys` (names without extension) from a labels CSV; ValueError naming a missing case."""
    names, values = read_labels_table(labels_csv, class_names)
    by_case = _by_case(names, values, Path(labels_csv))
    missing = [k for k in keys if k not in by_case]
    if missing:
        raise ValueError(f"{labels_csv}: no labels for case {missing[0]!r} ({len(missing)} of {len(keys)} missing)")
    return np.stack([by_case[k] for k in keys])


def check_comparable(a: EvaluatedRun, b: EvaluatedRun) -> None:
    """ValueError, saying how, when two runs were not scored on the same label set, cases or labels."""
    if set(a.class_names) != set(b.class_names):
        only_a = sorted(set(a.class_names) - set(b.class_names))
        only_b = sorted(set(b.class_names) - set(a.class_names))
        raise ValueError(f"{a.source} and {b.source} were scored on different label sets (only in the first: "
                         f"{only_a or 'none'}; only in the second: {only_b or 'none'})")
    if a.names != b.names:
        only_a = sorted(set(a.names) - set(b.names))
        only_b = sorted(set(b.names) - set(a.names))
        raise ValueError(f"{a.source} and {b.source} were scored on different cases: {len(only_a)} only in the first"
                         f"{f' (e.g. {only_a[0]})' if only_a else ''}, {len(only_b)} only in the second"
                         f"{f' (e.g. {only_b[0]})' if only_b else ''}")
    if a.labels is not None and b.labels is not None and not np.array_equal(a.labels, b.labels):
        row, column = (int(i[0]) for i in np.nonzero(a.labels != b.labels))
        raise ValueError(f"{a.source} and {b.source} were scored against different labels (case {a.names[row]!r}, "
                         f"class {a.class_names[column]!r}: {a.labels[row, column]} vs {b.labels[row, column]})")
