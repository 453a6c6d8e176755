"""The report's statistics: bootstrap intervals, calibration error and subgroups, as metrics and as tables.

:func:`report_statistics` adds to a report's metrics ``"confidence_intervals"`` (patient bootstrap of macro
AUROC, macro F1, CRG and each class's AUROC), ``"calibration_error"`` (ECE per class, before and after the
calibration) and, when subgroup labels are given, ``"subgroups"``; the ``*_table`` functions lay them out for the
HTML and Markdown pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctplatform.evaluation.bootstrap import DEFAULT_RESAMPLES, confidence_intervals, patients_of
from ctplatform.evaluation.reliability import calibration_errors
from ctplatform.evaluation.subgroups import DEFAULT_MIN_PATIENTS, subgroup_metrics, subgroup_rows


def report_statistics(
    metrics: dict[str, Any],
    volume_names: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    probs_raw: np.ndarray,
    probs_calibrated: np.ndarray | None,
    class_names: Sequence[str],
    threshold: float,
    *,
    patients: Sequence[Any] | None = None,
    subgroups: pd.DataFrame | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    min_patients: int = DEFAULT_MIN_PATIENTS,
) -> None:
    """Add the statistics to ``metrics`` in place. ``patients`` default to the CT-RATE patient of each volume name;
    ``n_resamples=0`` leaves the intervals (and the subgroups' intervals) out."""
    patients = patients_of(volume_names) if patients is None else np.asarray(patients)
    if n_resamples > 0:
        metrics["confidence_intervals"] = confidence_intervals(
            y_true, probs, patients, class_names, metrics, ranking=probs_raw, n_resamples=n_resamples, seed=seed,
            threshold=threshold)
    metrics["calibration_error"] = calibration_errors(y_true, probs_raw, probs_calibrated, class_names)
    if subgroups is not None:
        metrics["subgroups"] = subgroup_metrics(
            y_true, probs, patients, subgroups, class_names, ranking=probs_raw, min_patients=min_patients,
            n_resamples=n_resamples, seed=seed, threshold=threshold)


def _row(metric: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"metric": metric, "estimate": entry["estimate"], "95% low": entry["low"], "95% high": entry["high"],
            "valid resamples": entry["valid_resamples"]}


def interval_table(ci: dict[str, Any]) -> pd.DataFrame:
    """Macro AUROC, macro F1, CRG, then each class's AUROC, with their intervals."""
    rows = [_row("macro AUROC", ci["macro"]["auroc"]), _row("macro F1", ci["macro"]["f1"]), _row("CRG", ci["crg"])]
    rows += [_row(f"AUROC: {name}", entry["auroc"]) for name, entry in ci["per_class"].items()]
    return pd.DataFrame(rows)


def calibration_table(errors: dict[str, Any]) -> pd.DataFrame:
    rows = [{"class": "macro (mean)", **errors["macro"]}]
    rows += [{"class": name, **entry} for name, entry in errors["per_class"].items()]
    return pd.DataFrame(rows)


def subgroup_table(subgroups: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(subgroup_rows(subgroups))


def interval_note(ci: dict[str, Any]) -> str:
    return (f"{int(ci['level'] * 100)}% intervals: {ci['method']}; {ci['resamples']} resamples of "
            f"{ci['patients']} patients ({ci['volumes']} volumes), seed {ci['seed']}. The estimate is the official "
            "score of all cases; a resample without both labels of a class has no AUROC for it (see valid "
            "resamples).")
