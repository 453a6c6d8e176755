"""The official VLM3D Task 2 scoring, as the challenge's scorer computes it on volume-level probabilities.

* per class: AUROC (scikit-learn's ``roc_auc_score``; a class whose labels are all one value is skipped), and at
  the fixed decision ``p >= 0.5``: precision, recall, F1 (binary, positive class, ``zero_division=0``) and
  accuracy;
* macro = plain mean over the classes (NaN-ignoring for AUROC, because of skipped classes); no micro and no
  weights;
* CRG (the VLM3D organisers' clinically relevant score) on the same decisions: TP, FN, FP summed over classes and
  exams, X = C·N, A = total positives, r = (X−A)/(2A), U = (X−A)/2, s = r·TP − r·FN − FP, CRG = U/(2U − s).

AUROC measures a ranking, so it is always taken on the model's own volume probabilities; a calibration moves the
decision point and is monotone, so it changes precision, recall, F1, accuracy and CRG but never the AUROC
(:func:`score_predictions`' ``ranking``). :func:`decide` is the platform's one ``p >= 0.5`` decision. Pure numpy
and scikit-learn: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ctplatform.evaluation.decision import DECISION_THRESHOLD, decide
from ctplatform.labels import CLASS_NAMES

METRIC_NAMES = ("auroc", "precision", "recall", "f1", "accuracy")


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
    """CRG score of binary decisions (VLM3D Task 2), counts summed over all classes and exams.

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


def auroc_per_class(y_true: Any, probs: Any) -> np.ndarray:
    """(C,) scikit-learn AUROC of each class column of (N, C) labels and probabilities; NaN where a class has one
    label value (the official scorer skips it)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    return np.array([float(roc_auc_score(y_true[:, j], probs[:, j])) if np.unique(y_true[:, j]).size == 2
                     else float("nan") for j in range(y_true.shape[1])])


def macro_auroc(y_true: Any, probs: Any) -> float | None:
    """The official macro AUROC: the NaN-ignoring mean of :func:`auroc_per_class`; None if no class has both
    labels."""
    return _nan_ignoring_mean(auroc_per_class(y_true, probs))


def _nan_ignoring_mean(values: np.ndarray) -> float | None:
    # nanmean of an all-NaN slice warns and returns NaN; say None instead.
    return _float_or_none(float(np.nanmean(values))) if np.isfinite(values).any() else None


def score_predictions(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str] = CLASS_NAMES,
    threshold: float = DECISION_THRESHOLD,
    *,
    ranking: Any | None = None,
) -> dict[str, Any]:
    """Score volume-level probabilities exactly as the VLM3D Task 2 scorer does.

    ``y_true`` is (N, C) of 0/1 and ``probs`` is (N, C) in [0, 1], both in ``class_names`` order. Decisions
    are ``probs >= threshold`` (0.5 officially). AUROC ranks ``ranking`` if given (the model's uncalibrated
    probabilities when ``probs`` are calibrated ones: the AUROC is the model's, whatever the calibration), else
    ``probs``. Returns a JSON-ready dict::

        {"per_class": {name: {"auroc": float | None, "precision", "recall", "f1", "accuracy",
                              "support": positives, "n": exams}},
         "macro": {"auroc", "precision", "recall", "f1", "accuracy"},
         "crg": {"tp", "fn", "fp", "X", "A", "r", "U", "s", "crg"},
         "n_exams": N, "threshold": threshold}

    A class with a single label value has ``auroc`` None and is left out of the macro AUROC (the official
    NaN-ignoring mean); the threshold metrics of every class enter their macro means.
    """
    y_true, probs = _check_score_inputs(y_true, probs, class_names)
    ranked = probs if ranking is None else _check_score_inputs(y_true, ranking, class_names)[1]
    decisions = decide(probs, threshold).astype(np.int64)
    aurocs = auroc_per_class(y_true, ranked)
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        truth, decided = y_true[:, index], decisions[:, index]
        per_class[name] = {
            "auroc": _float_or_none(aurocs[index]),
            "precision": float(precision_score(truth, decided, zero_division=0)),
            "recall": float(recall_score(truth, decided, zero_division=0)),
            "f1": float(f1_score(truth, decided, zero_division=0)),
            "accuracy": float(accuracy_score(truth, decided)),
            "support": int(truth.sum()),
            "n": int(truth.size),
        }
    macro = {"auroc": _nan_ignoring_mean(aurocs)}
    for metric in METRIC_NAMES[1:]:
        macro[metric] = float(np.mean([per_class[name][metric] for name in class_names]))
    return {
        "per_class": per_class,
        "macro": macro,
        "crg": crg_score(y_true, decisions),
        "n_exams": int(y_true.shape[0]),
        "threshold": float(threshold),
    }
