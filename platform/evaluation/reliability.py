"""Calibration you can see: reliability diagrams per class and the expected calibration error (ECE).

Probabilities are put in ``n_bins`` equal-width bins on [0, 1] (the last bin includes 1). A bin's point is (mean
predicted probability, observed fraction of positives); a calibrated model's points lie on the diagonal. ECE =
Σ_b (n_b / N)·|fraction positive_b − mean probability_b| (Naeini et al. 2015; Guo et al. 2017). Shown before and
after the bundle's calibration: the calibration is fitted for the decision at 0.5 (Platt scaling with the F1-best
cut moved to 0.5), so after it a class's probabilities are honest near 0.5 but need not be elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DEFAULT_BINS = 10


def reliability_bins(y_true: Any, probs: Any, n_bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Per bin: ``count``, ``mean_prob`` and ``frac_positive`` (NaN for an empty bin), and the bin ``edges``."""
    y_true = np.asarray(y_true, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.shape != probs.shape or y_true.ndim != 1:
        raise ValueError(f"labels and probabilities must be 1-D of one length, got {y_true.shape}, {probs.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, weights=probs, minlength=n_bins) / count
        frac_positive = np.bincount(index, weights=y_true, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_prob": mean_prob, "frac_positive": frac_positive}


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = DEFAULT_BINS) -> float:
    bins = reliability_bins(y_true, probs, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["frac_positive"][filled] - bins["mean_prob"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / bins["count"].sum())


def calibration_errors(y_true: Any, probs_raw: Any, probs_calibrated: Any | None, class_names: Sequence[str],
                       n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """``{"bins", "per_class": {name: {"ece_uncalibrated", "ece_calibrated"}}, "macro": {...}}`` (macro = mean over
    classes; ``ece_calibrated`` only when calibrated probabilities are given)."""
    y_true, probs_raw = np.asarray(y_true), np.asarray(probs_raw, dtype=np.float64)
    per_class: dict[str, dict[str, float]] = {}
    for index, name in enumerate(class_names):
        entry = {"ece_uncalibrated": expected_calibration_error(y_true[:, index], probs_raw[:, index], n_bins)}
        if probs_calibrated is not None:
            entry["ece_calibrated"] = expected_calibration_error(
                y_true[:, index], np.asarray(probs_calibrated)[:, index], n_bins)
        per_class[name] = entry
    keys = list(next(iter(per_class.values())))
    macro = {key: float(np.mean([entry[key] for entry in per_class.values()])) for key in keys}
    return {"bins": n_bins, "method": "equal-width bins, ECE = sum_b n_b/N |frac positive - mean prob|",
            "per_class": per_class, "macro": macro}


def reliability_png(y_true: Any, probs_raw: Any, probs_calibrated: Any | None, class_names: Sequence[str],
                    errors: dict[str, Any], n_bins: int = DEFAULT_BINS) -> bytes:
    """One reliability diagram per class (a 6-wide grid): before calibration (grey x) and after (blue o), the
    diagonal, and each curve's ECE."""
    import io
    import math

    columns = min(6, max(len(class_names), 1))
    rows = math.ceil(len(class_names) / columns)
    figure = Figure(figsize=(3.0 * columns, 2.9 * rows), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    y_true = np.asarray(y_true)
    curves = [("uncalibrated", np.asarray(probs_raw, dtype=np.float64), "x", "0.45")]
    if probs_calibrated is not None:
        curves.append(("calibrated", np.asarray(probs_calibrated, dtype=np.float64), "o", "C0"))
    for index, name in enumerate(class_names):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        text = []
        for label, probs, marker, color in curves:
            bins = reliability_bins(y_true[:, index], probs[:, index], n_bins)
            filled = bins["count"] > 0
            axis.plot(bins["mean_prob"][filled], bins["frac_positive"][filled], marker=marker, color=color, lw=1,
                      ms=3, label=label)
            text.append(f"ECE {label[:5]}. {errors['per_class'][name]['ece_' + label]:.3f}")
        axis.text(0.97, 0.03, "\n".join(text), ha="right", va="bottom", fontsize=6)
        axis.set_title(name, fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.tick_params(labelsize=7)
        if index == 0:
            axis.legend(fontsize=6, loc="center right")
    figure.supxlabel("mean predicted probability (bin)", fontsize=9)
    figure.supylabel("fraction positive", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
