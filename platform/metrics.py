"""Official VLM3D Task 2 scoring and the challenge's file formats (DESIGN.md §4).

What the challenge computes, on volume-level probabilities, and nothing else:

* per class: AUROC (``roc_auc_score``; a class whose labels are all one value is skipped), and at the fixed
  decision ``p >= 0.5``: precision, recall, F1 (binary, positive class, ``zero_division=0``) and accuracy;
* macro = plain mean over the classes (NaN-ignoring for AUROC, because of skipped classes); no micro and
  no weights;
* CRG on the same decisions: TP, FN, FP summed over classes and exams, X = C·N, A = total positives,
  r = (X−A)/(2A), U = (X−A)/2, s = r·TP − r·FN − FP, CRG = U/(2U − s).

It also reads and writes the submission format (``results.json``) and a predictions CSV, and scores files
against a labels CSV (:func:`score_files`). Pure numpy + scikit-learn: no torch, so it runs anywhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ctplatform.atomic import write_json_atomic
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN, volume_stem

DEFAULT_THRESHOLD = 0.5
METRIC_NAMES = ("auroc", "precision", "recall", "f1", "accuracy")
# Longest first, so `.nii.gz` is stripped whole rather than leaving `.nii`.

# The constant part of a challenge submission (DESIGN.md §4).
RESULTS_JSON_HEADER: dict[str, Any] = {
    "name": "Generated probabilities",
    "type": "Abnormality Classification",
    "version": {"major": 1, "minor": 0},
}


# --------------------------------------------------------------------------------------------- validation
def _check_score_inputs(y_true: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as int 0/1, probs as float64), or raise ValueError naming what is wrong."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.ndim != 2:
        raise ValueError(f"y_true must be 2-D (exams, classes), got shape {y_true.shape}")
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (exams, classes), got shape {probs.shape}")
    if y_true.shape != probs.shape:
        raise ValueError(f"y_true shape {y_true.shape} and probs shape {probs.shape} differ")
    if y_true.shape[0] == 0:
        raise ValueError("no exams to score (y_true has 0 rows)")
    if y_true.shape[1] != len(class_names):
        raise ValueError(
            f"arrays have {y_true.shape[1]} class columns but class_names has {len(class_names)} names"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names contains duplicates")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(probs).all():
        rows, cols = np.nonzero(~np.isfinite(probs))
        raise ValueError(
            f"probs contain {rows.size} NaN/inf values "
            f"(first at exam {rows[0]}, class {class_names[cols[0]]!r})"
        )
    if probs.min() < 0.0 or probs.max() > 1.0:
        # Logits passed by mistake would otherwise be thresholded at 0.5 silently.
        raise ValueError(f"probs must lie in [0, 1], got range [{probs.min():.4g}, {probs.max():.4g}]")
    return y_true.astype(np.int64), probs


def _float_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined values are written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------- scoring
def crg_score(y_true: Any, y_pred_binary: Any) -> dict[str, float]:
    """CRG score of binary decisions (DESIGN.md §4), counts summed over all classes and exams.

    X = C·N (every label slot), A = positives among them, r = (X−A)/(2A), U = (X−A)/2,
    s = r·TP − r·FN − FP, CRG = U/(2U − s). A perfect prediction scores 1, predicting all negative 1/3.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred_binary)
    if y_true.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(
            "y_true and y_pred_binary must be 2-D arrays of the same shape, "
            f"got {y_true.shape} and {y_pred.shape}"
        )
    if not (np.isin(y_true, (0, 1)).all() and np.isin(y_pred, (0, 1)).all()):
        raise ValueError("y_true and y_pred_binary must contain only 0 and 1")
    truth = y_true.astype(bool)
    decided = y_pred.astype(bool)
    tp = int(np.sum(truth & decided))
    fn = int(np.sum(truth & ~decided))
    fp = int(np.sum(~truth & decided))
    total_slots = int(y_true.size)  # X
    positives = int(truth.sum())  # A
    if positives == 0:
        raise ValueError("CRG is undefined when there are no positive labels (A == 0: r divides by zero)")
    if positives == total_slots:
        raise ValueError("CRG is undefined when every label is positive (X == A: U = 0 and CRG = 0/0)")
    r = (total_slots - positives) / (2 * positives)
    u = (total_slots - positives) / 2
    s = r * tp - r * fn - fp
    return {
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "X": total_slots,
        "A": positives,
        "r": float(r),
        "U": float(u),
        "s": float(s),
        "crg": float(u / (2 * u - s)),
    }


def score_predictions(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str] = CLASS_NAMES,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Score volume-level probabilities exactly as the challenge does (DESIGN.md §4).

    ``y_true`` is (N, C) of 0/1 and ``probs`` is (N, C) in [0, 1], both in ``class_names`` order. Decisions
    are ``probs >= threshold`` (0.5 officially). Returns a JSON-ready dict::

        {"per_class": {name: {"auroc": float | None, "precision", "recall", "f1", "accuracy",
                              "support": positives, "n": exams}},
         "macro": {"auroc", "precision", "recall", "f1", "accuracy"},
         "crg": {"tp", "fn", "fp", "X", "A", "r", "U", "s", "crg"},
         "n_exams": N, "threshold": threshold}

    A class with a single label value has ``auroc`` None and is left out of the macro AUROC (the official
    NaN-ignoring mean); the threshold metrics of every class enter their macro means.
    """
    y_true, probs = _check_score_inputs(y_true, probs, class_names)
    decisions = (probs >= threshold).astype(np.int64)
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        truth, prob, decided = y_true[:, index], probs[:, index], decisions[:, index]
        auroc = float(roc_auc_score(truth, prob)) if np.unique(truth).size == 2 else float("nan")
        per_class[name] = {
            "auroc": auroc,
            "precision": float(precision_score(truth, decided, zero_division=0)),
            "recall": float(recall_score(truth, decided, zero_division=0)),
            "f1": float(f1_score(truth, decided, zero_division=0)),
            "accuracy": float(accuracy_score(truth, decided)),
            "support": int(truth.sum()),
            "n": int(truth.size),
        }
    macro: dict[str, float | None] = {}
    for metric in METRIC_NAMES:
        values = np.array([per_class[name][metric] for name in class_names], dtype=np.float64)
        # nanmean of an all-NaN slice warns and returns NaN; say None instead.
        macro[metric] = _float_or_none(float(np.nanmean(values))) if np.isfinite(values).any() else None
    for scores in per_class.values():
        scores["auroc"] = _float_or_none(scores["auroc"])
    return {
        "per_class": per_class,
        "macro": macro,
        "crg": crg_score(y_true, decisions),
        "n_exams": int(y_true.shape[0]),
        "threshold": float(threshold),
    }


# --------------------------------------------------------------------------------------------- file helpers
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
    """Write a challenge submission (DESIGN.md §4): one entry per case, every class name spelled exactly.

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


def read_predictions_csv(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """Read a predictions CSV: ``VolumeName`` plus one column per exact class name, in any order.

    Columns are aligned by name, never by position; other columns are ignored. Returns (names as written,
    probs (N, C) in ``class_names`` order). A missing class column is an error naming the class.
    """
    table = pd.read_csv(path)
    if VOLUME_COLUMN not in table.columns:
        raise ValueError(f"{path}: no {VOLUME_COLUMN!r} column (columns: {list(table.columns)})")
    missing = [cls for cls in class_names if cls not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing class column {missing[0]!r} (missing: {missing})")
    names = [str(name) for name in table[VOLUME_COLUMN]]
    _check_unique(names, str(path))
    try:
        probs = table[list(class_names)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: class columns must be numeric probabilities") from error
    return names, _check_probability_table(names, probs, class_names)


def _read_labels_table(
    path: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[list[str], np.ndarray]:
    """Labels CSV -> (VolumeNames, y_true (N, C) of 0/1 in ``class_names`` order), aligned by column name.

    Kept in one private function so the strict reader of ``ctplatform.data`` can replace it.
    """
    table = pd.read_csv(path)
    if VOLUME_COLUMN not in table.columns:
        raise ValueError(f"{path}: no {VOLUME_COLUMN!r} column (columns: {list(table.columns)})")
    missing = [cls for cls in class_names if cls not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing class column {missing[0]!r} (missing: {missing})")
    names = [str(name) for name in table[VOLUME_COLUMN]]
    labels = table[list(class_names)]
    if labels.isna().to_numpy().any():
        row = int(np.nonzero(labels.isna().to_numpy().any(axis=1))[0][0])
        raise ValueError(f"{path}: case {names[row]!r} has an empty label")
    values = labels.to_numpy()
    if not np.isin(values, (0, 1)).all():
        row = int(np.nonzero(~np.isin(values, (0, 1)).all(axis=1))[0][0])
        raise ValueError(f"{path}: case {names[row]!r} has a label other than 0/1")
    return names, values.astype(np.int64)


def score_files(
    labels_csv: str | os.PathLike,
    predictions_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Score a predictions file (CSV, or ``results.json`` when it ends in ``.json``) against a labels CSV.

    Cases are matched by name with extensions stripped (``train_1_a_1.nii.gz`` == ``train_1_a_1``). Every
    labelled case must have a prediction (else ValueError naming it); predictions for unlabelled cases are
    ignored, as the challenge scores only its own cases. Writes ``metrics.json`` into ``out_dir`` if given.
    """
    label_names, y_true = _read_labels_table(labels_csv, class_names)
    if str(predictions_path).lower().endswith(".json"):
        predicted_names, predicted_probs = read_results_json(predictions_path, class_names)
    else:
        predicted_names, predicted_probs = read_predictions_csv(predictions_path, class_names)

    label_keys = [volume_stem(name) for name in label_names]
    _check_unique(label_keys, f"{labels_csv} (after stripping extensions)")
    predicted_keys = [volume_stem(name) for name in predicted_names]
    _check_unique(predicted_keys, f"{predictions_path} (after stripping extensions)")
    row_of_case = {key: row for row, key in enumerate(predicted_keys)}
    missing = [name for name, key in zip(label_names, label_keys, strict=True) if key not in row_of_case]
    if missing:
        raise ValueError(
            f"{predictions_path}: no prediction for case {missing[0]!r} "
            f"({len(missing)} of {len(label_names)} labelled cases missing)"
        )
    probs = predicted_probs[[row_of_case[key] for key in label_keys]]
    metrics = score_predictions(y_true, probs, class_names=class_names, threshold=threshold)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics
