"""Patient-level bootstrap intervals: exact against scikit-learn on resampled rows, never splitting a patient, and
covering the true AUROC of a known generating model at about the nominal rate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import f1_score, roc_auc_score

from ctplatform.evaluation.bootstrap import (
    bootstrap_distributions,
    confidence_intervals,
    format_interval,
    patient_resample_weights,
    patients_of,
    weighted_auroc,
    weighted_decision_metrics,
)
from ctplatform.evaluation.metrics import crg_score, score_predictions

pytestmark = pytest.mark.timeout(120)


def _data(rng, volumes=120, classes=4, per_patient=2, tie_decimals=2):
    patients = np.repeat([f"valid_{i}" for i in range(volumes // per_patient)], per_patient)
    y = (rng.random((volumes // per_patient, classes)) < 0.3).astype(int).repeat(per_patient, axis=0)
    probs = np.round(np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0, 1), tie_decimals)  # many ties
    return patients, y, probs


def test_weighted_metrics_equal_sklearn_on_the_resampled_rows():
    rng = np.random.default_rng(1)
    patients, y, probs = _data(rng)
    weights = patient_resample_weights(patients, 20, seed=3)
    aurocs = weighted_auroc(y, probs, weights)
    decisions = probs >= 0.5
    decided = weighted_decision_metrics(y, decisions, weights)
    for b in range(weights.shape[0]):
        rows = np.repeat(np.arange(len(y)), weights[b])
        for c in range(y.shape[1]):
            expected = roc_auc_score(y[rows, c], probs[rows, c]) if np.unique(y[rows, c]).size == 2 else np.nan
            np.testing.assert_allclose(aurocs[b, c], expected, rtol=0, atol=1e-12, equal_nan=True)
            assert decided["f1"][b, c] == pytest.approx(f1_score(y[rows, c], decisions[rows, c], zero_division=0))
        assert decided["crg"][b] == pytest.approx(crg_score(y[rows], decisions[rows].astype(int))["crg"])


def test_a_class_with_one_label_value_in_a_resample_is_nan_not_an_error():
    y = np.array([[1], [0], [0], [0]])
    probs = np.array([[0.9], [0.2], [0.4], [0.1]])
    weights = np.array([[1, 1, 1, 1], [0, 2, 1, 1], [4, 0, 0, 0]])
    np.testing.assert_array_equal(weighted_auroc(y, probs, weights)[:, 0], [1.0, np.nan, np.nan])


def test_resampling_never_splits_a_patient_and_draws_every_patient_count_times():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=300)  # 1 to 4 volumes per patient, interleaved
    patients = rng.permutation(np.repeat([f"valid_{i}" for i in range(300)], sizes))
    weights = patient_resample_weights(patients, 200, seed=7)
    codes = np.unique(patients, return_inverse=True)[1]
    for patient in range(300):
        block = weights[:, codes == patient]
        assert (block == block[:, :1]).all(), "a patient's volumes were drawn a different number of times"
    first_volume = np.unique(codes, return_index=True)[1]
    per_patient = weights[:, first_volume]  # times each patient was drawn
    assert (per_patient.sum(axis=1) == 300).all()  # P draws of P patients each time
    assert (weights == patient_resample_weights(patients, 200, seed=7)).all()
    assert (weights != patient_resample_weights(patients, 200, seed=8)).any()


def test_duplicated_reconstructions_do_not_narrow_the_interval():
    """Two identical volumes per patient carry no more information than one: the patient bootstrap gives exactly the
    same resampled AUROCs (a volume bootstrap would narrow the interval by about 1/sqrt(2))."""
    rng = np.random.default_rng(4)
    y = (rng.random((150, 3)) < 0.3).astype(int)
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    single = bootstrap_distributions(y, probs, patient_resample_weights(np.arange(150), 300, seed=5))
    doubled = bootstrap_distributions(np.repeat(y, 2, axis=0), np.repeat(probs, 2, axis=0),
                                      patient_resample_weights(np.repeat(np.arange(150), 2), 300, seed=5))
    for key in ("auroc", "macro_auroc", "macro_f1", "crg"):
        np.testing.assert_allclose(single[key], doubled[key], rtol=1e-12, atol=1e-12, equal_nan=True)


def test_intervals_cover_the_true_auroc_at_about_the_nominal_rate():
    """Binormal model with a shared patient effect: positives' scores ~ N(d, 1), negatives' ~ N(0, 1), so the true
    AUROC is Phi(d / sqrt(2)); each patient has two reconstructions whose scores share most of their noise."""
    rng = np.random.default_rng(2024)
    d, patients_per_set, repeats = 1.0, 80, 150
    truth = norm.cdf(d / np.sqrt(2))
    covered = 0
    for repeat in range(repeats):
        y = (rng.random(patients_per_set) < 0.4).astype(int)
        shared = rng.normal(size=patients_per_set)
        scores = np.stack([d * y + np.sqrt(0.8) * shared + np.sqrt(0.2) * rng.normal(size=patients_per_set)
                           for _ in range(2)], axis=1).ravel()
        labels = np.repeat(y, 2)[:, None]
        probs = norm.cdf(scores)[:, None]
        point = score_predictions(labels, probs, class_names=["finding"])
        ci = confidence_intervals(labels, probs, np.repeat(np.arange(patients_per_set), 2), ["finding"], point,
                                  n_resamples=300, seed=repeat)
        entry = ci["per_class"]["finding"]["auroc"]
        covered += entry["low"] <= truth <= entry["high"]
    rate = covered / repeats
    assert 0.89 <= rate <= 0.99, f"coverage {rate:.3f} far from 0.95"


def test_confidence_intervals_record_resamples_seed_and_undefined_classes():
    rng = np.random.default_rng(9)
    patients, y, probs = _data(rng, volumes=200, classes=3)
    y[:, 2] = 0  # one label value in the whole data
    y[0, 1], y[1, 1] = 1, 1  # one positive patient: most resamples lack it
    y[2:, 1] = 0
    names = ["a", "b", "c"]
    point = score_predictions(y, probs, class_names=names)
    ci = confidence_intervals(y, probs, patients, names, point, n_resamples=200, seed=11)
    assert (ci["resamples"], ci["seed"], ci["patients"], ci["volumes"]) == (200, 11, 100, 200)
    assert ci["macro"]["auroc"]["estimate"] == point["macro"]["auroc"]
    assert ci["crg"]["estimate"] == point["crg"]["crg"]
    assert ci["macro"]["auroc"]["low"] <= point["macro"]["auroc"] <= ci["macro"]["auroc"]["high"]
    rare = ci["per_class"]["b"]["auroc"]
    assert 0 < rare["valid_resamples"] < 200  # P(patient 0 drawn) = 1 - (1 - 1/100)^100 ~ 0.63
    assert ci["per_class"]["c"]["auroc"] == {"estimate": None, "low": None, "high": None, "valid_resamples": 0,
                                              "note": ci["per_class"]["c"]["auroc"]["note"]}
    assert "one label value" in ci["per_class"]["c"]["auroc"]["note"]
    assert format_interval(ci["per_class"]["c"]["auroc"]) == "n/a"
    assert format_interval({"estimate": 0.5, "low": 0.4, "high": 0.61}, 2) == "0.50 [0.40, 0.61]"


def test_patients_of_ct_rate_names_and_bad_input():
    assert list(patients_of(["valid_7_b_2.nii.gz", "valid_7_a_1", "train_12_a_1.nii.gz", "case.mha"])) == [
        "valid_7", "valid_7", "train_12", "case.mha"]
    with pytest.raises(ValueError, match="one entry per volume"):
        confidence_intervals(np.zeros((4, 1)), np.zeros((4, 1)), ["p"] * 3, ["x"],
                             {"per_class": {}, "macro": {}, "crg": {}})
    with pytest.raises(ValueError, match="at least 1"):
        patient_resample_weights(["a"], 0, 0)


def test_run_summary_prints_each_headline_metric_with_its_interval():
    from ctplatform.cli import summary_line

    rng = np.random.default_rng(6)
    patients, y, probs = _data(rng, volumes=100, classes=3)
    names = ["a", "b", "c"]
    metrics = score_predictions(y, probs, class_names=names)
    assert "[" not in summary_line(metrics)
    metrics["confidence_intervals"] = ci = confidence_intervals(y, probs, patients, names, metrics, n_resamples=100,
                                                                seed=3)
    line = summary_line(metrics)
    assert f"macro AUROC {format_interval(ci['macro']['auroc'])}" in line
    assert f"CRG {format_interval(ci['crg'])}" in line and "100 patient-bootstrap resamples of 50 patients" in line
