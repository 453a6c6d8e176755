"""The challenge's file formats: the ``results.json`` submission, a predictions CSV and a labels CSV.

A VLM3D Task 2 submission is ``{"name": "Generated probabilities", "type": "Abnormality Classification",
"version": {"major": 1, "minor": 0}, "predictions": [{"input_image_name": <file name without extension>,
"probabilities": {<exact class name>: float, ...}}]}``. Cases are matched by name without extension, classes by
exact name, never by position; every error names the file, the case and the class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctplatform.atomic import write_json_atomic, write_text_atomic
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN, volume_stem

# The constant part of a challenge submission.
RESULTS_JSON_HEADER: dict[str, Any] = {
    "name": "Generated probabilities",
    "type": "Abnormality Classification",
    "version": {"major": 1, "minor": 0},
}


def _check_probability_table(names: Sequence[str], probs: Any, class_names: Sequence[str]) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(names), len(class_names)):
        raise ValueError(
            f"probs must have shape (len(names), len(class_names)) = ({len(names)}, {len(class_names)}), "
            f"got {probs.shape}"
        )
    if not np.isfinite(probs).all():
        row = int(np.nonzero(~np.isfinite(probs).all(axis=1))[0][0])
        raise ValueError(f"probs for case {names[row]!r} contain NaN/inf")
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise ValueError(f"probs must lie in [0, 1], got range [{probs.min():.4g}, {probs.max():.4g}]")
    return probs


def _check_unique(names: Sequence[str], source: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"case {name!r} appears more than once in {source}")
        seen.add(name)


def write_results_json(
    path: str | os.PathLike,
    names: Sequence[str],
    probs: Any,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Write a challenge submission: one entry per case, every class name spelled exactly.

    ``names`` are file names; ``.nii.gz``/``.nii``/``.mha`` are stripped because the challenge expects the
    name without extension. ``probs`` is (len(names), C) in ``class_names`` order.
    """
    image_names = [volume_stem(name) for name in names]
    _check_unique(image_names, "names (after stripping extensions)")
    probs = _check_probability_table(image_names, probs, class_names)
    predictions = [
        {
            "input_image_name": image_name,
            "probabilities": {cls: float(p) for cls, p in zip(class_names, row, strict=True)},
        }
        for image_name, row in zip(image_names, probs, strict=True)
    ]
    return write_json_atomic(path, {**RESULTS_JSON_HEADER, "predictions": predictions})


def read_results_json(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """Read a submission back as (case names, probs (N, C) in ``class_names`` order).

    Every prediction must carry exactly the class names (none missing, none extra, spelled exactly): the
    challenge matches them by name. Errors name the case and the class.
    """
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    if not isinstance(payload, dict) or not isinstance(payload.get("predictions"), list):
        raise ValueError(f"{path}: not a results.json (expected an object with a 'predictions' list)")
    expected = set(class_names)
    names: list[str] = []
    rows: list[list[float]] = []
    for position, entry in enumerate(payload["predictions"]):
        if not isinstance(entry, dict) or "input_image_name" not in entry or "probabilities" not in entry:
            raise ValueError(f"{path}: prediction #{position} lacks 'input_image_name' or 'probabilities'")
        case = str(entry["input_image_name"])
        probabilities = entry["probabilities"]
        if not isinstance(probabilities, dict):
            raise ValueError(f"{path}: case {case!r}: 'probabilities' must be an object of class -> float")
        missing = [cls for cls in class_names if cls not in probabilities]
        if missing:
            raise ValueError(f"{path}: case {case!r} is missing class {missing[0]!r} (missing: {missing})")
        extra = sorted(set(probabilities) - expected)
        if extra:
            raise ValueError(f"{path}: case {case!r} has unknown class {extra[0]!r} (check the spelling)")
        try:
            row = [float(probabilities[cls]) for cls in class_names]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: case {case!r} has a non-numeric probability") from error
        names.append(case)
        rows.append(row)
    _check_unique(names, str(path))
    probs = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(class_names))
    return names, _check_probability_table(names, probs, class_names)


def _read_class_table(path: str | os.PathLike, class_names: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """A CSV with ``VolumeName`` and a column per class name (any order, other columns allowed), and its names."""
    table = pd.read_csv(path)
    if VOLUME_COLUMN not in table.columns:
        raise ValueError(f"{path}: no {VOLUME_COLUMN!r} column (columns: {list(table.columns)})")
    missing = [cls for cls in class_names if cls not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing class column {missing[0]!r} (missing: {missing})")
    return table, [str(name) for name in table[VOLUME_COLUMN]]


def read_predictions_csv(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """Read a predictions CSV: ``VolumeName`` plus one column per exact class name, in any order.

    Columns are aligned by name, never by position; other columns are ignored. Returns (names as written,
    probs (N, C) in ``class_names`` order). A missing class column is an error naming the class.
    """
    table, names = _read_class_table(path, class_names)
    _check_unique(names, str(path))
    try:
        probs = table[list(class_names)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: class columns must be numeric probabilities") from error
    return names, _check_probability_table(names, probs, class_names)


def read_labels_table(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """Labels CSV -> (VolumeNames, y_true (N, C) of 0/1 in ``class_names`` order), aligned by column name."""
    table, names = _read_class_table(path, class_names)
    labels = table[list(class_names)]
    if labels.isna().to_numpy().any():
        row = int(np.nonzero(labels.isna().to_numpy().any(axis=1))[0][0])
        raise ValueError(f"{path}: case {names[row]!r} has an empty label")
    values = labels.to_numpy()
    if not np.isin(values, (0, 1)).all():
        row = int(np.nonzero(~np.isin(values, (0, 1)).all(axis=1))[0][0])
        raise ValueError(f"{path}: case {names[row]!r} has a label other than 0/1")
    return names, values.astype(np.int64)


def read_predictions(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """A predictions file: ``results.json`` when the name ends in ``.json``, else a predictions CSV."""
    if str(path).lower().endswith(".json"):
        return read_results_json(path, class_names)
    return read_predictions_csv(path, class_names)


def write_predictions_csv(
    path: str | os.PathLike, names: Sequence[str], probs: Any, class_names: Sequence[str] = CLASS_NAMES
) -> Path:
    """``VolumeName`` plus one probability column per exact class name, one row per case."""
    table = pd.DataFrame(np.asarray(probs), columns=list(class_names))
    table.insert(0, VOLUME_COLUMN, [str(name) for name in names])
    return write_text_atomic(path, table.to_csv(index=False))


def align_to_labels(
    label_names: Sequence[str],
    predicted_names: Sequence[str],
    predicted_probs: np.ndarray,
    labels_source: str,
    predictions_source: str,
) -> np.ndarray:
    """The predicted rows in the labelled cases' order, cases matched by name without extension.

    Every labelled case must have a prediction (else ValueError naming it); predictions for unlabelled cases are
    left out, as the challenge scores only its own cases.
    """
    label_keys = [volume_stem(name) for name in label_names]
    _check_unique(label_keys, f"{labels_source} (after stripping extensions)")
    predicted_keys = [volume_stem(name) for name in predicted_names]
    _check_unique(predicted_keys, f"{predictions_source} (after stripping extensions)")
    row_of_case = {key: row for row, key in enumerate(predicted_keys)}
    missing = [name for name, key in zip(label_names, label_keys, strict=True) if key not in row_of_case]
    if missing:
        raise ValueError(
            f"{predictions_source}: no prediction for case {missing[0]!r} "
            f"({len(missing)} of {len(label_names)} labelled cases missing)"
        )
    return predicted_probs[[row_of_case[key] for key in label_keys]]
