"""Bootstrap confidence intervals of the official metrics, resampling patients (never single volumes).

CT-RATE's reconstructions of a scan (and a patient's scans) share one label row, so volumes of a patient are not
independent cases: a bootstrap that draws volumes would pretend there is more data than there is. Each resample
draws P patients with replacement out of the P patients; a patient drawn k times contributes every one of its
volumes k times. A resample is therefore an integer weight per volume, equal for all volumes of a patient
(:func:`patient_resample_weights`), and every metric is computed on weights instead of copied rows:

* AUROC per class: the weighted Mann-Whitney statistic (ties count one half), from one sort per class and a
  cumulative sum of negative weight over tied-score groups, for all resamples at once (numpy, no Python loop over
  resamples). It equals scikit-learn's ``roc_auc_score`` on the resampled rows.
* F1 per class and CRG: weighted TP/FP/FN counts, one matrix product per resample chunk.

A class whose labels are all one value in a resample has no AUROC there (NaN, the official scorer skips it); the
macro AUROC of that resample is the mean over the classes that have one, and every interval records how many
resamples had a value (``valid_resamples``). Intervals are percentile intervals (Efron) of the valid resamples;
the point estimate is always the official score of the full data, never a bootstrap mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctplatform.data.splits import patient_of
from ctplatform.evaluation.decision import DECISION_THRESHOLD, decide

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
METHOD = "percentile bootstrap, resampling patients with replacement (all volumes of a drawn patient)"
_CHUNK = 250  # resamples per block: bounds memory to a few (chunk, volumes) float64 arrays


def patients_of(volume_names: Sequence[str]) -> np.ndarray:
    """CT-RATE patient of each volume name (``valid_7_b_2.nii.gz`` -> ``valid_7``); other names are their own."""
    return np.array([patient_of(str(name)) for name in volume_names])


def patient_resample_weights(patients: Sequence[Any], n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) int32: how many times each volume is in each resample.

    P patients are drawn with replacement P times per resample (numpy ``default_rng(seed)``); every volume of a
    patient gets that patient's count, so a patient is never split.
    """
    patients = np.asarray(patients)
    if patients.ndim != 1 or patients.size == 0:
        raise ValueError("patients must be a non-empty 1-D sequence (one patient id per volume)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    _, codes = np.unique(patients, return_inverse=True)
    num_patients = int(codes.max()) + 1
    draws = np.random.default_rng(seed).integers(0, num_patients, size=(n_resamples, num_patients))
    offsets = (np.arange(n_resamples) * num_patients)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * num_patients)
    return counts.reshape(n_resamples, num_patients).astype(np.int32)[:, codes]


def weighted_auroc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, C) AUROC of each class under each row of volume weights (B, N); NaN where a resample has no positive or
    no negative weight for a class. Ties between a positive and a negative count one half, as in
    ``roc_auc_score``."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out = np.empty((weights.shape[0], y_true.shape[1]))
    for column in range(y_true.shape[1]):
        order = np.argsort(scores[:, column], kind="stable")
        ranked, positive = scores[order, column], y_true[order, column].astype(bool)
        w = weights[:, order]
        pos = np.where(positive, w, 0.0)
        neg = w - pos
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        if starts.size < ranked.size:  # tied scores: one group per distinct value
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        numerator = np.einsum("bg,bg->b", pos, neg_below + 0.5 * neg)
        pos_total, neg_total = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, column] = np.where((pos_total > 0) & (neg_total > 0), numerator / (pos_total * neg_total), np.nan)
    return out


def _nan_mean_rows(values: np.ndarray) -> np.ndarray:
    """Row means over finite entries; NaN for a row without any (no RuntimeWarning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def weighted_decision_metrics(y_true: np.ndarray, decisions: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """F1 per class (B, C; zero_division=0), macro F1 (B,) and CRG (B,) of fixed decisions under volume weights.

    CRG as the VLM3D scorer: TP, FN, FP summed over classes and (weighted) exams, X = C·ΣN, A = positives,
    r = (X−A)/(2A), U = (X−A)/2, s = r·TP − r·FN − FP, CRG = U/(2U − s); NaN where A is 0 or X.
    """
    truth = np.asarray(y_true, dtype=np.float64)
    decided = np.asarray(decisions, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    tp = weights @ (truth * decided)
    fp = weights @ ((1.0 - truth) * decided)
    fn = weights @ (truth * (1.0 - decided))
    denominator = 2.0 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1e-300), 0.0)
        slots = weights.sum(axis=1) * truth.shape[1]
        positives = weights @ truth.sum(axis=1)
        r = (slots - positives) / (2.0 * positives)
        u = (slots - positives) / 2.0
        s = r * tp.sum(axis=1) - r * fn.sum(axis=1) - fp.sum(axis=1)
        crg = np.where((positives > 0) & (positives < slots), u / (2.0 * u - s), np.nan)
    return {"f1": f1, "macro_f1": f1.mean(axis=1), "crg": crg}


def bootstrap_distributions(
    y_true: Any,
    probs: Any,
    weights: np.ndarray,
    *,
    ranking: Any | None = None,
    threshold: float = DECISION_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Every metric under every resample: ``auroc`` (B, C), ``macro_auroc``, ``macro_f1``, ``crg`` (B,), ``f1``
    (B, C). AUROC ranks ``ranking`` if given (the model's raw probabilities), decisions are ``probs >= threshold``."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    ranked = probs if ranking is None else np.asarray(ranking, dtype=np.float64)
    decisions = decide(probs, threshold)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, weights.shape[0], _CHUNK):
        block = weights[start:start + _CHUNK]
        auroc = weighted_auroc(y_true, ranked, block)
        parts.append({"auroc": auroc, "macro_auroc": _nan_mean_rows(auroc),
                      **weighted_decision_metrics(y_true, decisions, block)})
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def interval(estimate: float | None, samples: np.ndarray, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """JSON-ready ``{"estimate", "low", "high", "valid_resamples"}``: the percentile interval of the finite
    samples (None when there are none or the estimate itself is undefined)."""
    finite = samples[np.isfinite(samples)]
    out: dict[str, Any] = {"estimate": estimate, "low": None, "high": None, "valid_resamples": int(finite.size)}
    if estimate is not None and finite.size:
        tail = 100.0 * (1.0 - level) / 2.0
        low, high = np.percentile(finite, [tail, 100.0 - tail])
        out.update(low=float(low), high=float(high))
    return out


def confidence_intervals(
    y_true: Any,
    probs: Any,
    patients: Sequence[Any],
    class_names: Sequence[str],
    point: dict[str, Any],
    *,
    ranking: Any | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    threshold: float = DECISION_THRESHOLD,
) -> dict[str, Any]:
    """95% (``level``) patient-bootstrap intervals of macro AUROC, macro F1, CRG and each class's AUROC.

    ``point`` is :func:`~ctplatform.evaluation.metrics.score_predictions`' result for the same inputs: its values
    are the estimates. A class with one label value in the full data has no AUROC and no interval (``"note"``).
    """
    y_true = np.asarray(y_true)
    patients = np.asarray(patients)
    if patients.shape != (y_true.shape[0],):
        raise ValueError(f"patients must have one entry per volume ({y_true.shape[0]}), got shape {patients.shape}")
    weights = patient_resample_weights(patients, n_resamples, seed)
    samples = bootstrap_distributions(y_true, probs, weights, ranking=ranking, threshold=threshold)
    per_class = {}
    for index, name in enumerate(class_names):
        estimate = point["per_class"][name]["auroc"]
        entry = interval(estimate, samples["auroc"][:, index], level)
        if estimate is None:
            entry["note"] = "one label value in the data: AUROC undefined (skipped, as the official scorer does)"
        per_class[name] = {"auroc": entry}
    return {
        "method": METHOD,
        "level": level,
        "resamples": int(n_resamples),
        "seed": int(seed),
        "patients": int(np.unique(patients).size),
        "volumes": int(y_true.shape[0]),
        "macro": {
            "auroc": interval(point["macro"]["auroc"], samples["macro_auroc"], level),
            "f1": interval(point["macro"]["f1"], samples["macro_f1"], level),
        },
        "crg": interval(point["crg"]["crg"], samples["crg"], level),
        "per_class": per_class,
    }


def format_interval(entry: dict[str, Any] | None, digits: int = 4) -> str:
    """``0.7312 [0.7101, 0.7519]``, or the estimate alone when there is no interval, or ``n/a``."""
    if not entry or entry.get("estimate") is None:
        return "n/a"
    text = f"{entry['estimate']:.{digits}f}"
    if entry.get("low") is not None:
        text += f" [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
    return text
