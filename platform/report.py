"""Evaluation report: the official metrics (DESIGN.md §4) of one run, as files a person or a program can read.

:func:`write_report` writes into one folder:

* ``metrics.json``: volume-level metrics of the reported probabilities (calibrated if given, else raw), the
  ``"uncalibrated"`` metrics of the raw probabilities, and ``"slice_level"`` metrics if asked for;
* ``predictions.csv``: ``VolumeName`` + one probability column per exact class name;
* ``results.json``: the same probabilities in the challenge's submission format;
* ``per_class.csv`` / ``per_class.md``: one row per class, before and after calibration;
* ``roc_curves.png`` / ``pr_curves.png``: one panel per class;
* ``report.html``: self-contained (images embedded as base64 data URIs).

Every file is written atomically (temp file in the same folder, then ``os.replace``), so a reader polling the
folder never sees half a file. Plots use matplotlib's Agg canvas directly (no pyplot, so no global backend
change and no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from ctplatform.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN
from ctplatform.metrics import (
    DEFAULT_THRESHOLD,
    METRIC_NAMES,
    score_predictions,
    write_results_json,
)

DEFAULT_TITLE = "CT-RATE multi-abnormality classification: evaluation report"
PANEL_COLUMNS = 6  # 18 classes -> a 3 × 6 grid
PER_CLASS_COLUMNS = (*METRIC_NAMES, "support", "n")


def _check_report_inputs(
    volume_names: Sequence[str],
    y_true: Any,
    probs_raw: Any,
    probs_calibrated: Any | None,
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y_true = np.asarray(y_true)
    probs_raw = np.asarray(probs_raw, dtype=np.float64)
    expected = (len(volume_names), len(class_names))
    if y_true.shape != expected:
        raise ValueError(f"y_true must have shape (len(volume_names), len(class_names)) = {expected}, "
                         f"got {y_true.shape}")
    if probs_raw.shape != expected:
        raise ValueError(f"probs_raw must have shape {expected}, got {probs_raw.shape}")
    if probs_calibrated is not None:
        probs_calibrated = np.asarray(probs_calibrated, dtype=np.float64)
        if probs_calibrated.shape != expected:
            raise ValueError(f"probs_calibrated must have shape {expected}, got {probs_calibrated.shape}")
    if len(set(volume_names)) != len(volume_names):
        raise ValueError("volume_names contains duplicates")
    return y_true, probs_raw, probs_calibrated


# --------------------------------------------------------------------------------------------- tables
def _per_class_table(metrics: dict[str, Any], uncalibrated: dict[str, Any] | None) -> pd.DataFrame:
    """One row per class; ``*_uncalibrated`` columns beside the calibrated ones if calibration was applied."""
    rows = []
    for name, scores in metrics["per_class"].items():
        row: dict[str, Any] = {"class": name}
        row.update({column: scores[column] for column in PER_CLASS_COLUMNS})
        if uncalibrated is not None:
            for metric in METRIC_NAMES:
                row[f"{metric}_uncalibrated"] = uncalibrated["per_class"][name][metric]
        rows.append(row)
    return pd.DataFrame(rows)


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = [
        "| " + " | ".join(_format_value(value) for value in row) + " |"
        for row in frame.astype(object).itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format_value(value))}</td>" for value in row) + "</tr>"
        for row in frame.astype(object).itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _macro_table(metrics: dict[str, Any], uncalibrated: dict[str, Any] | None) -> pd.DataFrame:
    rows = []
    if uncalibrated is not None:
        rows.append(
            {"probabilities": "uncalibrated", **uncalibrated["macro"], "crg": uncalibrated["crg"]["crg"]}
        )
    label = "calibrated" if uncalibrated is not None else "raw"
    rows.append({"probabilities": label, **metrics["macro"], "crg": metrics["crg"]["crg"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- plots
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
    decided = probs >= threshold
    positives, negatives = truth.sum(), (1 - truth).sum()
    tp = float(np.sum(decided & (truth == 1)))
    fp = float(np.sum(decided & (truth == 0)))
    fpr = fp / negatives if negatives else 0.0
    recall = tp / positives if positives else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    return fpr, recall, precision


def _curve_pngs(
    y_true: np.ndarray,
    probs: np.ndarray,
    probs_raw: np.ndarray | None,
    class_names: Sequence[str],
    metrics: dict[str, Any],
    threshold: float,
) -> tuple[bytes, bytes]:
    """ROC and PR curves, one panel per class, with the operating point(s) at ``p >= threshold`` marked.

    Calibration is monotone, so one curve serves both; the uncalibrated operating point (if given) shows how
    far calibration moved the decision.
    """
    roc_figure, roc_axes = _grid_figure(len(class_names))
    pr_figure, pr_axes = _grid_figure(len(class_names))
    for index, name in enumerate(class_names):
        truth, prob = y_true[:, index], probs[:, index]
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
        if probs_raw is not None:
            points.append((probs_raw[:, index], "x", "k", f"p≥{threshold:g} uncalibrated"))
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


# --------------------------------------------------------------------------------------------- html
_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}img{max-width:100%}"
)


def _report_html(
    title: str,
    metrics: dict[str, Any],
    macro: pd.DataFrame,
    per_class: pd.DataFrame,
    roc_png: bytes,
    pr_png: bytes,
    calibrated: bool,
) -> str:
    def image(png: bytes, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'

    crg = metrics["crg"]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{metrics['n_exams']} exams, decisions at p ≥ {metrics['threshold']:g}; probabilities "
        f"{'calibrated per class on validation' if calibrated else 'raw (no calibration)'}. "
        "Scored as VLM3D Task 2: per-class AUROC (one-valued classes skipped), precision/recall/F1/accuracy "
        "at the threshold, macro = plain mean, CRG on the same decisions.</p>",
        "<h2>Macro</h2>",
        _html_table(macro),
        f"<p>CRG counts: TP {crg['tp']}, FN {crg['fn']}, FP {crg['fp']}, X {crg['X']}, A {crg['A']}.</p>",
    ]
    if "slice_level" in metrics:
        slice_metrics = metrics["slice_level"]
        slice_macro = pd.DataFrame([{**slice_metrics["macro"], "crg": slice_metrics["crg"]["crg"]}])
        parts += ["<h2>Slice level (raw)</h2>", _html_table(slice_macro)]
    parts += [
        "<h2>Per class</h2>",
        "<p>Columns ending in <code>_uncalibrated</code> are before calibration.</p>" if calibrated else "",
        _html_table(per_class),
        "<h2>ROC curves</h2>",
        image(roc_png, "ROC curves per class"),
        "<h2>Precision–recall curves</h2>",
        image(pr_png, "Precision-recall curves per class"),
        "</body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- entry point
def write_report(
    out_dir: str | os.PathLike,
    volume_names: Sequence[str],
    y_true: Any,
    probs_raw: Any,
    probs_calibrated: Any | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    slice_level: dict[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Score and write the evaluation report into ``out_dir``; returns the metrics in ``metrics.json``.

    ``y_true``, ``probs_raw`` and ``probs_calibrated`` are (N, C) in ``class_names`` order, one row per
    ``volume_names`` entry. The reported probabilities (metrics, predictions.csv, results.json, curves) are
    the calibrated ones if given, else the raw ones. ``slice_level={"y_true": (M, C), "probs": (M, C)}`` adds
    slice-level metrics under ``"slice_level"``, for diagnosis only: the challenge scores volumes.
    """
    volume_names = [str(name) for name in volume_names]
    y_true, probs_raw, probs_calibrated = _check_report_inputs(
        volume_names, y_true, probs_raw, probs_calibrated, class_names
    )
    calibrated = probs_calibrated is not None
    probs = probs_calibrated if calibrated else probs_raw
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    uncalibrated = score_predictions(y_true, probs_raw, class_names=class_names, threshold=threshold)
    metrics = (
        score_predictions(y_true, probs, class_names=class_names, threshold=threshold) if calibrated
        else dict(uncalibrated)
    )
    metrics["calibrated"] = calibrated
    metrics["uncalibrated"] = uncalibrated
    if slice_level is not None:
        if "y_true" not in slice_level or "probs" not in slice_level:
            raise ValueError("slice_level must be a dict with 'y_true' and 'probs' arrays")
        metrics["slice_level"] = score_predictions(
            slice_level["y_true"], slice_level["probs"], class_names=class_names, threshold=threshold
        )
    write_json_atomic(out_dir / "metrics.json", metrics)

    predictions = pd.DataFrame(probs, columns=list(class_names))
    predictions.insert(0, VOLUME_COLUMN, volume_names)
    write_text_atomic(out_dir / "predictions.csv", predictions.to_csv(index=False))
    write_results_json(out_dir / "results.json", volume_names, probs, class_names)

    per_class = _per_class_table(metrics, uncalibrated if calibrated else None)
    macro = _macro_table(metrics, uncalibrated if calibrated else None)
    write_text_atomic(out_dir / "per_class.csv", per_class.to_csv(index=False))
    markdown = (
        f"# {title}\n\n{metrics['n_exams']} exams, decisions at p >= {threshold:g}.\n\n## Macro\n\n"
        f"{_markdown_table(macro)}\n\n## Per class\n\n{_markdown_table(per_class)}\n"
    )
    write_text_atomic(out_dir / "per_class.md", markdown)

    roc_png, pr_png = _curve_pngs(
        y_true, probs, probs_raw if calibrated else None, class_names, metrics, threshold
    )
    write_bytes_atomic(out_dir / "roc_curves.png", roc_png)
    write_bytes_atomic(out_dir / "pr_curves.png", pr_png)
    write_text_atomic(
        out_dir / "report.html", _report_html(title, metrics, macro, per_class, roc_png, pr_png, calibrated)
    )
    return metrics
