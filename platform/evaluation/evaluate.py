"""The evaluation entry point: :func:`evaluate` scores a checkpoint or bundle on the cache's validation split
(`run`/`evaluate`, and `tune` for its best epoch), :func:`score_files` scores a predictions file against a labels
CSV (`score`); both exactly as the VLM3D Task 2 scorer does.

One number per metric. Macro AUROC is the AUROC of the model's volume probabilities (the same number that
training logs as ``val/volume_auroc`` for that epoch); calibration is monotone and cannot change it. Precision,
recall, F1, accuracy and CRG are those of the calibrated decisions at ``p >= 0.5`` that the bundle ships, and the
report's ``predictions.csv`` and ``results.json`` hold exactly those calibrated probabilities, so scoring them
with `score` gives every figure of ``metrics.json`` again.

Calibration: for a checkpoint (or a bundle without one), per-class calibration is fitted on the whole validation
split and shipped in the exported bundle. Its decisions are then scored on the cases it was fitted on, which
flatters F1 and CRG; the report adds ``held_out_calibration``, the same metrics when each half of the patients is
calibrated by a fit on the other half (2-fold by patient), as the estimate for unseen cases. Those two
calibrations are different maps, so the held-out probabilities are not one monotone function of the model's:
their own ranking is never reported as an AUROC. A bundle that carries a calibration is applied as is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctplatform.atomic import write_json_atomic
from ctplatform.data.datasets import load_cache_index
from ctplatform.evaluation.bootstrap import DEFAULT_RESAMPLES, confidence_intervals, patients_of
from ctplatform.evaluation.calibration import fit_calibration
from ctplatform.evaluation.decision import DECISION_THRESHOLD
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.predictor import Predictor
from ctplatform.evaluation.report import write_report
from ctplatform.evaluation.results import align_to_labels, read_labels_table, read_predictions
from ctplatform.evaluation.subgroups import DEFAULT_MIN_PATIENTS, read_subgroups
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import export_bundle


def predict_split(predictor: Predictor, slice_dir: str | Path, split: str = "valid") -> dict:
    """Volume-level raw probabilities (and slice-level ones) for every cached volume of a split."""
    index = load_cache_index(slice_dir)
    if index.layout != "cache":
        raise ValueError(f"{slice_dir}: evaluation needs a prepared cache (ctplatform prepare), not the legacy layout")
    rows = index.split_volumes(split)
    if not len(rows):
        raise ValueError(f"{slice_dir}: no {split!r} volumes in the cache")
    labels = index.labels()
    names, volume_probs, slice_probs, slice_targets, patients = [], [], [], [], []
    for row in rows:
        record = index.volumes.iloc[row]
        slices = np.load(index.local_file(record["file"]), mmap_mode="r")
        prediction = predictor.predict_prepared(np.asarray(slices), np.asarray(record["slice_positions"]))
        names.append(record["VolumeName"])
        patients.append(record["patient"])
        volume_probs.append(prediction.raw_probabilities)
        slice_probs.append(prediction.slice_probabilities)
        slice_targets.append(np.repeat(labels[row][None], len(slices), axis=0))
    return {
        "names": names,
        "patients": np.array(patients),
        "y_true": labels[rows].astype(np.int64),
        "probs": np.stack(volume_probs),
        "slice_probs": np.concatenate(slice_probs),
        "slice_y_true": np.concatenate(slice_targets).astype(np.int64),
    }


def held_out_calibrated(y_true: np.ndarray, probs: np.ndarray, patients: np.ndarray, seed: int = 0) -> np.ndarray:
    """Calibrated probabilities where each patient's cases were calibrated by a fit on the other half (for held-out
    estimates of the decision metrics only: two different maps do not preserve the ranking across halves)."""
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    fold = np.array([p in half for p in patients])
    out = np.empty_like(probs)
    for side in (True, False):
        fit_on, apply_to = fold != side, fold == side
        if not apply_to.any():
            continue
        calibration = fit_calibration(y_true[fit_on], probs[fit_on]) if fit_on.any() else None
        out[apply_to] = calibration.apply(probs[apply_to]) if calibration is not None else probs[apply_to]
    return out


def evaluate(
    source: str | Path,
    slice_dir: str | Path,
    report_dir: str | Path,
    *,
    bundle_dir: str | Path | None = None,
    device: str | None = None,
    subgroup_metadata: str | os.PathLike | None = None,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    min_group_patients: int = DEFAULT_MIN_PATIENTS,
) -> dict:
    """Score `source` (bundle or checkpoint) on the validation split; write the report, export a bundle.

    Returns the report's metrics (``metrics.json``): ``macro``/``per_class``/``crg`` of the calibrated decisions
    with the model's AUROC, ``uncalibrated``, ``slice_level``, ``confidence_intervals`` (patient bootstrap,
    ``bootstrap_resamples`` with ``bootstrap_seed``), ``calibration_error``, ``subgroups`` when a CT-RATE metadata
    CSV is given (``subgroup_metadata``) and, when the calibration was fitted here, ``held_out_calibration``.
    """
    predictor = Predictor.from_path(source, device=device)
    split = predict_split(predictor, slice_dir)
    y_true, raw = split["y_true"], split["probs"]
    slice_level = {"y_true": split["slice_y_true"], "probs": split["slice_probs"]}
    held_out = None
    if predictor.spec.calibration is None:
        predictor.spec.calibration = fit_calibration(y_true, raw)
        held_out = held_out_calibrated(y_true, raw, split["patients"])
    subgroups = read_subgroups(subgroup_metadata, split["names"]) if subgroup_metadata else None
    metrics = write_report(report_dir, split["names"], y_true, raw, predictor.calibrate(raw), CLASS_NAMES,
                           slice_level=slice_level, held_out=held_out, patients=split["patients"],
                           subgroups=subgroups, bootstrap_resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed,
                           min_group_patients=min_group_patients)
    if bundle_dir is not None:
        predictor.spec.metrics = {
            "validation_volumes": len(split["names"]),
            "macro_auroc": metrics["macro"]["auroc"],
            "macro_f1_calibrated": metrics["macro"]["f1"],
            "crg_calibrated": metrics["crg"]["crg"],
            "macro_f1_uncalibrated": metrics["uncalibrated"]["macro"]["f1"],
        }
        if "confidence_intervals" in metrics:
            ci = metrics["confidence_intervals"]
            predictor.spec.metrics["confidence_intervals_95"] = {
                "macro_auroc": [ci["macro"]["auroc"]["low"], ci["macro"]["auroc"]["high"]],
                "macro_f1_calibrated": [ci["macro"]["f1"]["low"], ci["macro"]["f1"]["high"]],
                "crg_calibrated": [ci["crg"]["low"], ci["crg"]["high"]],
                "resamples": ci["resamples"], "seed": ci["seed"], "unit": "patient"}
        if held_out is not None:
            predictor.spec.metrics.update(
                macro_f1_calibrated_crossfit=metrics["held_out_calibration"]["macro"]["f1"],
                crg_calibrated_crossfit=metrics["held_out_calibration"]["crg"]["crg"],
            )
        export_bundle(bundle_dir, predictor.model, predictor.spec)
    return metrics


def score_files(
    labels_csv: str | os.PathLike,
    predictions_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    threshold: float = DECISION_THRESHOLD,
    bootstrap_resamples: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Score a predictions file (CSV, or ``results.json`` when it ends in ``.json``) against a labels CSV.

    Cases are matched by name with extensions stripped (``train_1_a_1.nii.gz`` == ``train_1_a_1``). Every
    labelled case must have a prediction (else ValueError naming it); predictions for unlabelled cases are
    ignored, as the challenge scores only its own cases. Writes ``metrics.json`` into ``out_dir`` if given. With
    ``bootstrap_resamples`` > 0 (`ctplatform score` asks for 1,000), adds ``confidence_intervals`` (patients read
    from the CT-RATE case names).
    """
    label_names, y_true = read_labels_table(labels_csv, class_names)
    predicted_names, predicted_probs = read_predictions(predictions_path, class_names)
    probs = align_to_labels(label_names, predicted_names, predicted_probs, str(labels_csv), str(predictions_path))
    metrics = score_predictions(y_true, probs, class_names=class_names, threshold=threshold)
    if bootstrap_resamples > 0:
        metrics["confidence_intervals"] = confidence_intervals(
            y_true, probs, patients_of(label_names), class_names, metrics, n_resamples=bootstrap_resamples,
            seed=bootstrap_seed, threshold=threshold)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics
