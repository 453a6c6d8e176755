"""Fitting the per-class calibration on validation (Platt scaling, then the F1-best cut moved onto 0.5).

Why: four of the five official VLM3D Task 2 metrics (precision, recall, F1, accuracy, and CRG besides) are
computed on the fixed decision ``p >= 0.5``. Multi-label models trained on rare classes (with focal or asymmetric
losses especially) put most probabilities far from 0.5, so an uncalibrated model with a fair AUROC can score a
macro F1 near zero. The fitted :class:`~ctplatform.model.calibration.Calibration` moves each class's operating
point to 0.5 without changing the ranking, so AUROC is untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctplatform.model.calibration import METHOD_PLATT_F1, PROB_EPS, Calibration, logit, sigmoid

# A fitted slope at or below zero means the class score carries no usable (or inverted) signal on validation;
# a tiny positive slope keeps the transform strictly increasing, so ranking and AUROC are preserved anyway.
MIN_SLOPE = 1e-3
# Ridge on the slope only: keeps Newton finite when validation is perfectly separable.
SLOPE_L2 = 1e-4
# When the F1-best cut is below the lowest validation score, put 0.5 this many logits below it.
LOGIT_MARGIN_BELOW_ALL = 1.0
# Halvings of a slope that rounds distinct validation scores onto one float64 probability (see _keep_order).
MAX_FLATTENINGS = 64


def _fit_platt(scores: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """Logistic regression of ``labels`` on one score (a logit): returns (slope, intercept).

    Damped Newton in float64 on the mean log-loss plus ``SLOPE_L2``·slope²/2. Two parameters, so the Hessian
    is 2×2 and this converges in a handful of steps; no scikit-learn solver warnings on separable data.
    """

    def loss(a: float, b: float) -> float:
        z = a * scores + b
        # mean of log(1 + e^z) − y·z, written stably.
        return float(np.mean(np.logaddexp(0.0, z) - labels * z) + 0.5 * SLOPE_L2 * a * a)

    a, b = 1.0, float(logit(np.clip(labels.mean(), PROB_EPS, 1 - PROB_EPS)))
    current = loss(a, b)
    for _ in range(max_iter):
        q = sigmoid(a * scores + b)
        residual = q - labels
        weight = q * (1.0 - q)
        gradient = np.array([np.mean(residual * scores) + SLOPE_L2 * a, np.mean(residual)])
        hessian = np.array(
            [
                [np.mean(weight * scores * scores) + SLOPE_L2, np.mean(weight * scores)],
                [np.mean(weight * scores), np.mean(weight) + 1e-12],
            ]
        )
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-8:  # backtracking keeps every step a descent step
            candidate = loss(a - scale * step[0], b - scale * step[1])
            if candidate <= current:
                break
            scale *= 0.5
        else:
            break
        a, b = a - scale * float(step[0]), b - scale * float(step[1])
        improvement, current = current - candidate, candidate
        if improvement < 1e-12 and np.max(np.abs(scale * step)) < 1e-8:
            break
    return a, b


def _fit_intercept_only(scores: np.ndarray, labels: np.ndarray, slope: float, max_iter: int = 100) -> float:
    """Best intercept for a fixed slope (1-D Newton on the mean log-loss; convex)."""
    b = 0.0
    for _ in range(max_iter):
        q = sigmoid(slope * scores + b)
        step = np.mean(q - labels) / max(float(np.mean(q * (1.0 - q))), 1e-12)
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-10:
            break
    return b


def f1_best_logit_threshold(calibrated_logits: np.ndarray, labels: np.ndarray) -> float:
    """A cut c such that deciding ``logit >= c`` maximises F1 on these cases.

    Every distinct score is a candidate cut (predict positive at or above it). The returned cut lies midway
    (in logit space) between the best candidate and the next lower distinct score, so the decision on
    validation is the F1-best one with a margin against rounding, and unseen cases between the two are split
    evenly. Ties in F1 go to the higher cut (fewer false positives).
    """
    order = np.argsort(-calibrated_logits, kind="stable")
    sorted_logits = calibrated_logits[order]
    true_positives = np.cumsum(labels[order])
    # Last index of each run of equal scores: a cut at that score predicts everything up to there.
    run_ends = np.nonzero(np.r_[sorted_logits[1:] != sorted_logits[:-1], True])[0]
    predicted_positive = run_ends + 1
    tp = true_positives[run_ends]
    f1 = 2.0 * tp / (predicted_positive + labels.sum())
    best = int(np.argmax(f1))  # first maximum = highest cut
    best_cut = float(sorted_logits[run_ends[best]])
    if best + 1 < run_ends.size:
        next_lower = float(sorted_logits[run_ends[best + 1]])
        return 0.5 * (best_cut + next_lower)
    return best_cut - LOGIT_MARGIN_BELOW_ALL


def _keep_order(scores: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
    """(slope, intercept), the slope halved about the 0.5 point until distinct scores stay distinct.

    ``sigmoid(slope·z + intercept)`` is strictly increasing, but float64 rounds it to 1 above z ≈ 37 (and near
    there it resolves only coarse steps), so a steep fit can give two validation cases one calibrated probability:
    their order, and the AUROC a scorer computes from the calibrated file, would change. Halving the slope about
    the point that maps to 0.5 keeps every decision at 0.5 and flattens the map until it separates them.
    """
    distinct = np.unique(scores)
    zero_at = -intercept / slope
    for _ in range(MAX_FLATTENINGS):
        if (np.diff(sigmoid(slope * distinct + intercept)) > 0).all():
            break
        slope *= 0.5
        intercept = -slope * zero_at
    return slope, intercept


def fit_calibration(y_true: Any, probs: Any) -> Calibration:
    """Fit per-class calibration on validation so that ``p >= 0.5`` is a good operating point (VLM3D Task 2 scoring).

    Per class, on z = logit(clip(p)):

    1. Platt scaling: logistic regression of the labels on z gives (a, b), so ``sigmoid(a·z + b)`` are
       calibrated probabilities (a is kept > 0: the map must stay increasing, so AUROC is unchanged).
    2. Threshold shift: the official precision, recall, F1, accuracy and CRG all use the fixed cut 0.5, and a
       calibrated probability of 0.5 is rarely the F1-best cut for a rare class. We find the cut t* that
       maximises F1 on the Platt-calibrated validation probabilities and subtract logit(t*) from the
       intercept, so t* maps exactly to 0.5.

    3. Order kept: if float64 would round distinct validation scores onto one calibrated probability, the slope
       is flattened about the 0.5 point (:func:`_keep_order`), so the calibrated validation probabilities rank
       the cases exactly as the raw ones: the same AUROC, whichever of the two a scorer is given.

    A class whose validation labels are all one value has nothing to fit and gets identity (slope 1,
    intercept 0).
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != probs.shape:
        raise ValueError(
            "y_true and probs must be 2-D (exams, classes) of the same shape, "
            f"got {y_true.shape} and {probs.shape}"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN/inf")
    num_classes = probs.shape[1]
    slopes, intercepts = np.ones(num_classes), np.zeros(num_classes)
    for index in range(num_classes):
        labels = y_true[:, index].astype(np.float64)
        if np.unique(labels).size < 2:
            continue  # identity
        scores = logit(probs[:, index])
        slope, intercept = _fit_platt(scores, labels)
        if slope < MIN_SLOPE:
            slope = MIN_SLOPE
            intercept = _fit_intercept_only(scores, labels, slope)
        cut = f1_best_logit_threshold(slope * scores + intercept, labels)
        slopes[index], intercepts[index] = _keep_order(scores, slope, intercept - cut)
    return Calibration(slopes, intercepts, METHOD_PLATT_F1)
