"""ROC and precision-recall curves of an evaluation, one panel per class, as PNG bytes.

matplotlib's Agg canvas is used directly (no pyplot), so there is no global backend change and no display needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from ctplatform.evaluation.decision import decide

PANEL_COLUMNS = 6  # 18 classes -> a 3 × 6 grid


def _grid_figure(num_panels: int) -> tuple[Figure, list[Any]]:
    columns = min(PANEL_COLUMNS, max(num_panels, 1))
    rows = math.ceil(num_panels / columns)
    figure = Figure(figsize=(3.0 * columns, 2.9 * rows), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, columns, index + 1) for index in range(num_panels)]
    return figure, axes


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _operating_point(truth: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, recall, precision) of the decision ``probs >= threshold``."""
    decided = decide(probs, threshold)
    positives, negatives = truth.sum(), (1 - truth).sum()
    tp = float(np.sum(decided & (truth == 1)))
    fp = float(np.sum(decided & (truth == 0)))
    fpr = fp / negatives if negatives else 0.0
    recall = tp / positives if positives else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    return fpr, recall, precision


def curve_pngs(
    y_true: np.ndarray,
    probs_raw: np.ndarray,
    probs_calibrated: np.ndarray | None,
    class_names: Sequence[str],
    metrics: dict[str, Any],
    threshold: float,
) -> tuple[bytes, bytes]:
    """ROC and PR curves of the model's (raw) probabilities, one panel per class, with the operating point(s) at
    ``p >= threshold`` marked.

    Calibration is monotone, so one curve serves both; with a calibration, the uncalibrated operating point shows
    how far calibration moved the decision.
    """
    roc_figure, roc_axes = _grid_figure(len(class_names))
    pr_figure, pr_axes = _grid_figure(len(class_names))
    for index, name in enumerate(class_names):
        truth, prob = y_true[:, index], probs_raw[:, index]
        roc_axis, pr_axis = roc_axes[index], pr_axes[index]
        for axis in (roc_axis, pr_axis):
            axis.set_title(name, fontsize=9)
            axis.set_xlim(0, 1)
            axis.set_ylim(0, 1.02)
            axis.tick_params(labelsize=7)
        if np.unique(truth).size < 2:
            for axis in (roc_axis, pr_axis):
                axis.text(0.5, 0.5, "one label value:\nskipped", ha="center", va="center", fontsize=8)
            continue
        fpr, tpr, _ = roc_curve(truth, prob)
        roc_axis.plot(fpr, tpr, lw=1.2)
        roc_axis.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        roc_axis.text(0.98, 0.03, f"AUROC {metrics['per_class'][name]['auroc']:.3f}", ha="right", fontsize=7)
        precision, recall, _ = precision_recall_curve(truth, prob)
        pr_axis.plot(recall, precision, lw=1.2)
        pr_axis.axhline(truth.mean(), ls=":", color="grey", lw=0.8)
        points = [(prob, "o", "C3", f"p≥{threshold:g}")]
        if probs_calibrated is not None:
            points = [(probs_calibrated[:, index], "o", "C3", f"p≥{threshold:g}"),
                      (prob, "x", "k", f"p≥{threshold:g} uncalibrated")]
        for point_probs, marker, color, label in points:
            op_fpr, op_recall, op_precision = _operating_point(truth, point_probs, threshold)
            # clip_on=False: an operating point on the frame (nothing predicted positive) must stay visible.
            style = {"marker": marker, "color": color, "ls": "none", "label": label, "clip_on": False}
            roc_axis.plot([op_fpr], [op_recall], **style)
            pr_axis.plot([op_recall], [op_precision], **style)
        if index == 0:
            roc_axis.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1.0, 0.1))
            pr_axis.legend(fontsize=6, loc="upper right")
    for figure, x_label, y_label in ((roc_figure, "false-positive rate", "recall"),
                                     (pr_figure, "recall", "precision")):
        figure.supxlabel(x_label, fontsize=9)
        figure.supylabel(y_label, fontsize=9)
    return _figure_png(roc_figure), _figure_png(pr_figure)
