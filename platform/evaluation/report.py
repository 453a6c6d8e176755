"""Evaluation report: the official VLM3D Task 2 metrics of one run, as files a person or a program can read.

:func:`write_report` writes into one folder:

* ``metrics.json``: volume-level metrics of the reported probabilities (calibrated if given, else raw) with the
  AUROC of the raw ones (a calibration never changes it), the ``"uncalibrated"`` metrics of the raw
  probabilities, ``"held_out_calibration"`` (decisions of a calibration fitted without the case) and
  ``"slice_level"`` metrics if asked for; ``"confidence_intervals"`` (patient bootstrap: macro AUROC, macro F1,
  CRG, per-class AUROC, with resamples and seed), ``"calibration_error"`` (ECE per class, before and after
  calibration) and, with subgroup labels, ``"subgroups"`` (:mod:`ctplatform.evaluation.report_stats`);
* ``labels.csv``: the labels scored against (so `ctplatform compare` can test two runs on the same cases), and
  ``predictions_uncalibrated.csv``, the model's own probabilities, when a calibration was applied;
* ``predictions.csv``: ``VolumeName`` + one probability column per exact class name;
* ``results.json``: the same probabilities in the challenge's submission format;
* ``per_class.csv`` / ``per_class.md``: one row per class, before and after calibration;
* ``roc_curves.png`` / ``pr_curves.png`` / ``reliability.png``: one panel per class;
* ``report.html``: self-contained (images embedded as base64 data URIs).

Every file is written atomically (temp file in the same folder, then ``os.replace``), so a reader polling the
folder never sees half a file.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctplatform.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from ctplatform.evaluation.bootstrap import DEFAULT_RESAMPLES
from ctplatform.evaluation.decision import DECISION_THRESHOLD
from ctplatform.evaluation.metrics import METRIC_NAMES, score_predictions
from ctplatform.evaluation.plots import curve_pngs
from ctplatform.evaluation.reliability import reliability_png
from ctplatform.evaluation.report_stats import (
    calibration_table,
    interval_note,
    interval_table,
    report_statistics,
    subgroup_table,
)
from ctplatform.evaluation.results import write_predictions_csv, write_results_json
from ctplatform.evaluation.subgroups import DEFAULT_MIN_PATIENTS
from ctplatform.labels import CLASS_NAMES

DEFAULT_TITLE = "CT-RATE multi-abnormality classification: evaluation report"
PER_CLASS_COLUMNS = (*METRIC_NAMES, "support", "n")


def _check_report_inputs(
    volume_names: Sequence[str],
    y_true: Any,
    probs_raw: Any,
    probs_calibrated: Any | None,
    held_out: Any | None,
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
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
    if held_out is not None:
        if probs_calibrated is None:
            raise ValueError("held_out needs probs_calibrated: it estimates the calibrated decisions' metrics")
        held_out = np.asarray(held_out, dtype=np.float64)
        if held_out.shape != expected:
            raise ValueError(f"held_out must have shape {expected}, got {held_out.shape}")
    if len(set(volume_names)) != len(volume_names):
        raise ValueError("volume_names contains duplicates")
    return y_true, probs_raw, probs_calibrated, held_out


# --------------------------------------------------------------------------------------------- tables
def _per_class_table(metrics: dict[str, Any], uncalibrated: dict[str, Any] | None) -> pd.DataFrame:
    """One row per class; ``*_uncalibrated`` columns beside the calibrated ones if calibration was applied."""
    rows = []
    for name, scores in metrics["per_class"].items():
        row: dict[str, Any] = {"class": name}
        row.update({column: scores[column] for column in PER_CLASS_COLUMNS})
        if uncalibrated is not None:  # AUROC is the model's either way: one column
            for metric in METRIC_NAMES[1:]:
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
    if "held_out_calibration" in metrics:
        held_out = metrics["held_out_calibration"]
        rows.append({"probabilities": "calibrated, held out (2-fold by patient)", **held_out["macro"],
                     "crg": held_out["crg"]["crg"]})
    return pd.DataFrame(rows)


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
    reliability: bytes,
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
        "at the threshold, macro = plain mean, CRG on the same decisions. AUROC is the model's: calibration "
        "is monotone and leaves it unchanged.</p>",
        "<h2>Macro</h2>",
        _html_table(macro),
        f"<p>CRG counts: TP {crg['tp']}, FN {crg['fn']}, FP {crg['fp']}, X {crg['X']}, A {crg['A']}.</p>",
    ]
    if "held_out_calibration" in metrics:
        parts.append("<p>The calibration was fitted on these cases, which flatters the decision metrics; the held-out "
                     "row scores each half of the patients calibrated by a fit on the other half.</p>")
    if "slice_level" in metrics:
        slice_metrics = metrics["slice_level"]
        slice_macro = pd.DataFrame([{**slice_metrics["macro"], "crg": slice_metrics["crg"]["crg"]}])
        parts += ["<h2>Slice level (raw)</h2>", _html_table(slice_macro)]
    if "confidence_intervals" in metrics:
        ci = metrics["confidence_intervals"]
        parts += ["<h2>Confidence intervals</h2>", f"<p>{html.escape(interval_note(ci))}</p>",
                  _html_table(interval_table(ci))]
    if "subgroups" in metrics:
        parts += ["<h2>Subgroups</h2>",
                  f"<p>Macro AUROC, macro F1 and CRG per group, with patient-bootstrap intervals; groups under "
                  f"{metrics['subgroups']['min_patients']} patients are too small to report.</p>",
                  _html_table(subgroup_table(metrics["subgroups"]))]
    parts += [
        "<h2>Calibration</h2>",
        "<p>Expected calibration error (10 equal-width bins) and reliability diagrams, before and after the "
        "calibration: points on the diagonal are calibrated probabilities.</p>",
        _html_table(calibration_table(metrics["calibration_error"])),
        image(reliability, "Reliability diagrams per class"),
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
    threshold: float = DECISION_THRESHOLD,
    held_out: Any | None = None,
    *,
    patients: Sequence[Any] | None = None,
    subgroups: pd.DataFrame | None = None,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    min_group_patients: int = DEFAULT_MIN_PATIENTS,
) -> dict[str, Any]:
    """Score and write the evaluation report into ``out_dir``; returns the metrics in ``metrics.json``.

    ``y_true``, ``probs_raw`` and ``probs_calibrated`` are (N, C) in ``class_names`` order, one row per
    ``volume_names`` entry. The reported probabilities (decision metrics, predictions.csv, results.json) are
    the calibrated ones if given, else the raw ones; AUROC and the curves are always the raw ones'. ``held_out``
    (N, C), calibrated probabilities where no case's calibration was fitted on it, adds the held-out estimate of
    the decision metrics under ``"held_out_calibration"``. ``slice_level={"y_true": (M, C), "probs": (M, C)}``
    adds slice-level metrics under ``"slice_level"``, for diagnosis only: the challenge scores volumes.

    ``patients`` (one id per volume; default: the CT-RATE patient in each name) are what the bootstrap resamples
    (``bootstrap_resamples``, ``bootstrap_seed``; 0 resamples leaves the intervals out); ``subgroups``, one row
    per volume with ``sex``, ``age`` and ``manufacturer`` (:func:`~ctplatform.evaluation.subgroups.read_subgroups`),
    adds per-group metrics (groups under ``min_group_patients`` patients reported as too small).
    """
    volume_names = [str(name) for name in volume_names]
    y_true, probs_raw, probs_calibrated, held_out = _check_report_inputs(
        volume_names, y_true, probs_raw, probs_calibrated, held_out, class_names
    )
    calibrated = probs_calibrated is not None
    probs = probs_calibrated if calibrated else probs_raw
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    uncalibrated = score_predictions(y_true, probs_raw, class_names=class_names, threshold=threshold)
    metrics = (
        score_predictions(y_true, probs, class_names=class_names, threshold=threshold, ranking=probs_raw)
        if calibrated else dict(uncalibrated)
    )
    metrics["calibrated"] = calibrated
    metrics["uncalibrated"] = uncalibrated
    if held_out is not None:
        metrics["held_out_calibration"] = score_predictions(
            y_true, held_out, class_names=class_names, threshold=threshold, ranking=probs_raw
        )
    if slice_level is not None:
        if "y_true" not in slice_level or "probs" not in slice_level:
            raise ValueError("slice_level must be a dict with 'y_true' and 'probs' arrays")
        metrics["slice_level"] = score_predictions(
            slice_level["y_true"], slice_level["probs"], class_names=class_names, threshold=threshold
        )
    report_statistics(metrics, volume_names, y_true, probs, probs_raw, probs_calibrated, class_names, threshold,
                      patients=patients, subgroups=subgroups, n_resamples=bootstrap_resamples, seed=bootstrap_seed,
                      min_patients=min_group_patients)
    write_json_atomic(out_dir / "metrics.json", metrics)

    write_predictions_csv(out_dir / "predictions.csv", volume_names, probs, class_names)
    write_predictions_csv(out_dir / "labels.csv", volume_names, y_true, class_names)
    if calibrated:
        write_predictions_csv(out_dir / "predictions_uncalibrated.csv", volume_names, probs_raw, class_names)
    write_results_json(out_dir / "results.json", volume_names, probs, class_names)

    per_class = _per_class_table(metrics, uncalibrated if calibrated else None)
    macro = _macro_table(metrics, uncalibrated if calibrated else None)
    write_text_atomic(out_dir / "per_class.csv", per_class.to_csv(index=False))
    markdown = (
        f"# {title}\n\n{metrics['n_exams']} exams, decisions at p >= {threshold:g}.\n\n## Macro\n\n"
        f"{_markdown_table(macro)}\n\n## Per class\n\n{_markdown_table(per_class)}\n"
    )
    if "confidence_intervals" in metrics:
        ci = metrics["confidence_intervals"]
        markdown += f"\n## Confidence intervals\n\n{interval_note(ci)}\n\n{_markdown_table(interval_table(ci))}\n"
    if "subgroups" in metrics:
        markdown += f"\n## Subgroups\n\n{_markdown_table(subgroup_table(metrics['subgroups']))}\n"
    write_text_atomic(out_dir / "per_class.md", markdown)

    roc_png, pr_png = curve_pngs(y_true, probs_raw, probs_calibrated, class_names, metrics, threshold)
    write_bytes_atomic(out_dir / "roc_curves.png", roc_png)
    write_bytes_atomic(out_dir / "pr_curves.png", pr_png)
    reliability = reliability_png(y_true, probs_raw, probs_calibrated, class_names, metrics["calibration_error"])
    write_bytes_atomic(out_dir / "reliability.png", reliability)
    write_text_atomic(out_dir / "report.html",
                      _report_html(title, metrics, macro, per_class, roc_png, pr_png, calibrated, reliability))
    return metrics
