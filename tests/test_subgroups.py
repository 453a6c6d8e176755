"""Subgroups from CT-RATE metadata (planted group effects recovered, too-small groups not scored), calibration error
and reliability diagrams, and the report that carries them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from ctplatform.evaluation.calibration import fit_calibration
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.reliability import calibration_errors, expected_calibration_error, reliability_bins
from ctplatform.evaluation.report import write_report
from ctplatform.evaluation.subgroups import age_band, read_subgroups, subgroup_metrics
from ctplatform.labels import CLASS_NAMES

pytestmark = pytest.mark.timeout(180)


def planted_cohort(patients=400, seed=0):
    """Two reconstructions per patient. The model sees findings well in men scanned on 'GE' and not at all in women;
    every 'Tiny' scanner patient (5 of them) is too few to score."""
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(patients) < 0.5, "M", "F")
    age = rng.integers(25, 90, size=patients)
    maker = np.where(rng.random(patients) < 0.5, "GE", "Siemens")
    maker[:5] = "Tiny"
    y = (rng.random((patients, len(CLASS_NAMES))) < 0.3).astype(int)
    signal = np.where(sex == "M", 2.0, 0.0)[:, None] * y
    logits = signal + rng.normal(size=y.shape) - 1.0
    names = [f"valid_{p}_a_{r}.nii.gz" for p in range(patients) for r in (1, 2)]
    y2 = y.repeat(2, axis=0)
    probs = 1 / (1 + np.exp(-(logits.repeat(2, axis=0) + 0.1 * rng.normal(size=y2.shape))))
    metadata = pd.DataFrame({"VolumeName": names, "PatientSex": sex.repeat(2),
                             "PatientAge": [f"{a:03d}Y" for a in age.repeat(2)], "Manufacturer": maker.repeat(2),
                             "Rows": 512})
    return names, y2, probs, metadata


def test_planted_sex_effect_is_recovered_and_small_groups_are_not_scored(tmp_path):
    names, y, probs, metadata = planted_cohort()
    metadata.to_csv(tmp_path / "validation_metadata.csv", index=False)
    groups = read_subgroups(tmp_path / "validation_metadata.csv", names)
    patients = np.array([n.rsplit("_", 2)[0] for n in names])
    result = subgroup_metrics(y, probs, patients, groups, CLASS_NAMES, min_patients=30, n_resamples=200, seed=1)
    sex = result["attributes"]["sex"]
    men, women = sex["M"], sex["F"]
    assert men["patients"] + women["patients"] == 400 and men["volumes"] == 2 * men["patients"]
    mask = (groups["sex"] == "M").to_numpy()
    expected = np.mean([roc_auc_score(y[mask, c], probs[mask, c]) for c in range(len(CLASS_NAMES))])
    assert men["auroc"]["estimate"] == pytest.approx(expected, abs=1e-12)
    assert men["auroc"]["low"] > 0.8 and women["auroc"]["high"] < 0.6  # the planted effect, clearly separated
    assert 0.4 < women["auroc"]["estimate"] < 0.6
    tiny = result["attributes"]["manufacturer"]["Tiny"]
    assert tiny == {"volumes": 10, "patients": 5, "too_small": True}
    assert list(result["attributes"]["manufacturer"]) == ["GE", "Siemens", "Tiny"]
    assert set(result["attributes"]["age"]) <= {"<40", "40-59", "60-74", ">=75"}


def test_metadata_errors_and_age_strings(tmp_path):
    names, _, _, metadata = planted_cohort(patients=10)
    metadata.drop(columns=["Manufacturer"]).to_csv(tmp_path / "no_maker.csv", index=False)
    with pytest.raises(ValueError, match=r"no_maker.csv: metadata CSV lacks column\(s\) Manufacturer"):
        read_subgroups(tmp_path / "no_maker.csv", names)
    metadata.assign(VolumeName=[n.replace("valid", "train") for n in names]).to_csv(tmp_path / "train.csv",
                                                                                    index=False)
    with pytest.raises(ValueError, match="none of the 20 evaluated volumes"):
        read_subgroups(tmp_path / "train.csv", names)
    partial = metadata.iloc[2:].copy()
    partial.loc[partial.index[0], "PatientSex"] = ""
    partial.to_csv(tmp_path / "partial.csv", index=False)
    groups = read_subgroups(tmp_path / "partial.csv", names)
    assert list(groups["sex"][:3]) == ["unknown", "unknown", "unknown"]
    assert [age_band(a) for a in ("058Y", "039Y", "075Y", "006M", "", "abc", "60")] == [
        "40-59", "<40", ">=75", "<40", "unknown", "unknown", "60-74"]


def test_expected_calibration_error_against_sklearn_bins():
    rng = np.random.default_rng(3)
    probs = rng.random(5000) ** 2
    labels = (rng.random(5000) < np.sqrt(probs)).astype(int)  # miscalibrated on purpose
    bins = reliability_bins(labels, probs, 10)
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["frac_positive"][filled], prob_true)
    np.testing.assert_allclose(bins["mean_prob"][filled], prob_pred)
    counts = np.histogram(probs, bins=np.linspace(0, 1, 11))[0]
    expected = np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / counts.sum()
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)
    assert expected_calibration_error([0, 1, 0, 1], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.4)
    honest = rng.random(20000)
    assert expected_calibration_error((rng.random(20000) < honest).astype(int), honest) < 0.02


def test_report_carries_intervals_subgroups_and_calibration(tmp_path):
    names, y, probs, metadata = planted_cohort(patients=120, seed=5)
    calibrated = fit_calibration(y, probs).apply(probs)
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    groups = read_subgroups(tmp_path / "meta.csv", names)
    out = tmp_path / "report"
    metrics = write_report(out, names, y, probs, calibrated, subgroups=groups, bootstrap_resamples=200,
                           bootstrap_seed=4)
    written = json.loads((out / "metrics.json").read_text())
    ci = written["confidence_intervals"]
    assert (ci["resamples"], ci["seed"], ci["patients"], ci["volumes"]) == (200, 4, 120, 240)
    assert ci["macro"]["auroc"]["estimate"] == score_predictions(y, probs)["macro"]["auroc"]
    assert ci["macro"]["f1"]["estimate"] == score_predictions(y, calibrated)["macro"]["f1"]
    assert ci["macro"]["auroc"]["low"] < ci["macro"]["auroc"]["estimate"] < ci["macro"]["auroc"]["high"]
    assert written["subgroups"]["attributes"]["manufacturer"]["Tiny"]["too_small"] is True
    errors = calibration_errors(y, probs, calibrated, CLASS_NAMES)
    assert written["calibration_error"] == json.loads(json.dumps(errors))
    assert metrics["calibration_error"]["per_class"][CLASS_NAMES[0]]["ece_calibrated"] == pytest.approx(
        expected_calibration_error(y[:, 0], calibrated[:, 0]))
    labels = pd.read_csv(out / "labels.csv")
    np.testing.assert_array_equal(labels[list(CLASS_NAMES)].to_numpy(), y)
    raw = pd.read_csv(out / "predictions_uncalibrated.csv")
    np.testing.assert_allclose(raw[list(CLASS_NAMES)].to_numpy(), probs, rtol=0, atol=1e-15)
    page = (out / "report.html").read_text()
    for heading in ("Confidence intervals", "Subgroups", "Calibration", "too small (&lt; 30 patients)",
                    "200 resamples of 120 patients"):
        assert heading in page, heading
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Confidence intervals" in (out / "per_class.md").read_text()


def test_evaluate_with_the_metadata_csv_reports_subgroups(tiny_dataset, tiny_cache, tmp_path):
    """`ctplatform evaluate --subgroup-metadata` end to end on the synthetic data set's own metadata CSV (which has
    PatientSex, PatientAge and Manufacturer as CT-RATE's does), with a bundle of deterministic weights."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from compat_bundles import build_bundle

    from ctplatform.evaluation.evaluate import evaluate

    bundle = build_bundle("slice", tmp_path)
    metadata = tiny_dataset / "dataset" / "metadata" / "validation_metadata.csv"
    metrics = evaluate(bundle, tiny_cache, tmp_path / "report", device="cpu", subgroup_metadata=metadata,
                       bootstrap_resamples=50, bootstrap_seed=2, min_group_patients=2)
    table = pd.read_csv(metadata)
    sexes = metrics["subgroups"]["attributes"]["sex"]
    assert sum(group["volumes"] for group in sexes.values()) == metrics["n_exams"]
    for sex, group in sexes.items():
        assert group["volumes"] == int((table["PatientSex"] == sex).sum()), sex
        assert group.get("too_small") is (True if group["patients"] < 2 else None)
    assert metrics["confidence_intervals"]["resamples"] == 50 and metrics["confidence_intervals"]["seed"] == 2
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["subgroups"] == json.loads(
        json.dumps(metrics["subgroups"]))


def test_without_resamples_groups_get_estimates_only():
    names, y, probs, metadata = planted_cohort(patients=80, seed=2)
    groups = pd.DataFrame({"sex": metadata["PatientSex"], "age": "40-59", "manufacturer": "GE"})
    patients = np.array([n.rsplit("_", 2)[0] for n in names])
    result = subgroup_metrics(y, probs, patients, groups, CLASS_NAMES, min_patients=10, n_resamples=0)
    men = result["attributes"]["sex"]["M"]
    mask = (groups["sex"] == "M").to_numpy()
    assert men["auroc"] == {"estimate": score_predictions(y[mask], probs[mask])["macro"]["auroc"], "low": None,
                            "high": None, "valid_resamples": 0}
