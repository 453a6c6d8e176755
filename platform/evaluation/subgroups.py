"""Metrics per patient group: sex, age band and scanner manufacturer, from CT-RATE's metadata CSV.

CT-RATE's ``metadata/validation_metadata.csv`` has ``PatientSex`` (``M``/``F``), ``PatientAge`` (DICOM age
strings such as ``058Y``; ``D``/``W``/``M`` units are converted to years) and ``Manufacturer``. Each group is scored
with the official rules (macro AUROC, macro F1, CRG) and a patient-bootstrap interval, with its size in volumes and
patients. A group with fewer than ``min_patients`` patients is reported as too small, without numbers: an AUROC on
a dozen cases says nothing and invites over-reading. Volumes the CSV does not list, or lists with an empty value,
form the group ``unknown``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctplatform.evaluation.bootstrap import DEFAULT_RESAMPLES, confidence_intervals, format_interval
from ctplatform.evaluation.decision import DECISION_THRESHOLD
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.labels import VOLUME_COLUMN, volume_stem

SUBGROUP_COLUMNS = {"sex": "PatientSex", "age": "PatientAge", "manufacturer": "Manufacturer"}
# Lower edges in years: "<40", "40-59", "60-74", ">=75".
AGE_BANDS = ((0, "<40"), (40, "40-59"), (60, "60-74"), (75, ">=75"))
DEFAULT_MIN_PATIENTS = 30
UNKNOWN = "unknown"
_AGE = re.compile(r"^\s*(\d+)\s*([DWMY]?)\s*$", re.IGNORECASE)
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def age_years(text: Any) -> float | None:
    """DICOM age string (``058Y``, ``006M``, ``42``) -> years; None when empty or not an age."""
    match = _AGE.match(str(text)) if text is not None else None
    return int(match[1]) * _YEARS_PER_UNIT[match[2].upper()] if match else None


def age_band(text: Any) -> str:
    years = age_years(text)
    if years is None:
        return UNKNOWN
    return [label for low, label in AGE_BANDS if years >= low][-1]


def _sex(text: Any) -> str:
    value = str(text).strip().upper()
    return {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}.get(value, value or UNKNOWN)


def read_subgroups(path: str | os.PathLike, volume_names: Sequence[str]) -> pd.DataFrame:
    """One row per evaluated volume (in order) with columns ``sex``, ``age``, ``manufacturer`` (group labels).

    Raises ValueError naming the file when a needed column is missing, or when no evaluated volume is listed
    (the wrong split's metadata, most likely).
    """
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    needed = [VOLUME_COLUMN, *SUBGROUP_COLUMNS.values()]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: metadata CSV lacks column(s) {', '.join(missing)} (subgroups need "
                         f"{', '.join(needed)})")
    table = table.assign(_stem=table[VOLUME_COLUMN].map(volume_stem)).drop_duplicates("_stem").set_index("_stem")
    stems = [volume_stem(name) for name in volume_names]
    listed = [stem in table.index for stem in stems]
    if not any(listed):
        raise ValueError(f"{path}: none of the {len(stems)} evaluated volumes is in this metadata CSV (e.g. "
                         f"{stems[0]!r}); give the metadata of the evaluated split")
    rows = table.reindex(stems)
    return pd.DataFrame({
        "sex": [(_sex(v) if ok else UNKNOWN) for v, ok in zip(rows["PatientSex"], listed, strict=True)],
        "age": [(age_band(v) if ok else UNKNOWN) for v, ok in zip(rows["PatientAge"], listed, strict=True)],
        "manufacturer": [(str(v).strip() or UNKNOWN) if ok else UNKNOWN
                         for v, ok in zip(rows["Manufacturer"], listed, strict=True)],
    })


def _group_order(attribute: str, labels: pd.Series) -> list[str]:
    present = set(labels)
    if attribute == "age":
        order = [label for _, label in AGE_BANDS]
        return [g for g in order if g in present] + sorted(present - set(order))
    return sorted(present - {UNKNOWN}) + ([UNKNOWN] if UNKNOWN in present else [])


def subgroup_metrics(
    y_true: Any,
    probs: Any,
    patients: Sequence[Any],
    groups: pd.DataFrame,
    class_names: Sequence[str],
    *,
    ranking: Any | None = None,
    min_patients: int = DEFAULT_MIN_PATIENTS,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    threshold: float = DECISION_THRESHOLD,
) -> dict[str, Any]:
    """``{"min_patients", "attributes": {attribute: {group: entry}}}``; an entry has ``volumes`` and ``patients``
    and either ``too_small: True`` or the group's ``auroc``/``f1``/``crg`` intervals (as
    :func:`~ctplatform.evaluation.bootstrap.interval`). A group whose labels leave a metric undefined (no positive
    at all) reports it as None."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    ranked = probs if ranking is None else np.asarray(ranking, dtype=np.float64)
    patients = np.asarray(patients)
    if len(groups) != y_true.shape[0]:
        raise ValueError(f"groups has {len(groups)} rows for {y_true.shape[0]} volumes")
    attributes: dict[str, dict[str, Any]] = {}
    for attribute in SUBGROUP_COLUMNS:
        if attribute not in groups:
            raise ValueError(f"groups lacks the column {attribute!r}")
        labels = groups[attribute].astype(str)
        table: dict[str, Any] = {}
        for group in _group_order(attribute, labels):
            mask = (labels == group).to_numpy()
            entry: dict[str, Any] = {"volumes": int(mask.sum()), "patients": int(np.unique(patients[mask]).size)}
            if entry["patients"] < min_patients:
                entry["too_small"] = True
            else:
                entry.update(_group_scores(y_true[mask], probs[mask], ranked[mask], patients[mask], class_names,
                                           n_resamples, seed, threshold))
            table[group] = entry
        attributes[attribute] = table
    return {"min_patients": int(min_patients), "attributes": attributes}


def _group_scores(y_true, probs, ranked, patients, class_names, n_resamples, seed, threshold) -> dict[str, Any]:
    if y_true.sum() == 0 or y_true.sum() == y_true.size:
        # CRG is undefined without a positive (or a negative) label: say so instead of failing the report
        return {"auroc": None, "f1": None, "crg": None, "note": "all labels one value in this group"}
    point = score_predictions(y_true, probs, class_names=class_names, threshold=threshold, ranking=ranked)
    if n_resamples < 1:  # estimates only
        return {metric: {"estimate": value, "low": None, "high": None, "valid_resamples": 0} for metric, value in
                (("auroc", point["macro"]["auroc"]), ("f1", point["macro"]["f1"]), ("crg", point["crg"]["crg"]))}
    ci = confidence_intervals(y_true, probs, patients, class_names, point, ranking=ranked, n_resamples=n_resamples,
                              seed=seed, threshold=threshold)
    return {"auroc": ci["macro"]["auroc"], "f1": ci["macro"]["f1"], "crg": ci["crg"]}


def subgroup_rows(subgroups: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (attribute, group, volumes, patients, macro AUROC / F1 / CRG as text) for the report's table."""
    rows = []
    for attribute, table in subgroups["attributes"].items():
        for group, entry in table.items():
            row = {"attribute": attribute, "group": group, "volumes": entry["volumes"], "patients": entry["patients"]}
            for metric, label in (("auroc", "macro AUROC"), ("f1", "macro F1"), ("crg", "CRG")):
                row[label] = (f"too small (< {subgroups['min_patients']} patients)" if entry.get("too_small")
                              else format_interval(entry.get(metric)))
            rows.append(row)
    return rows
