"""Per-class calibration: monotone (AUROC unchanged), moves the F1-best cut to 0.5, stored as plain JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from ctplatform.evaluation.calibration import fit_calibration
from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE
from ctplatform.model.calibration import Calibration


def miscalibrated_set(num_exams: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels at CT-RATE prevalence and a useful score squashed far below 0.5: sigmoid(0.3·score − 3)."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([VALID_PREVALENCE[name] for name in CLASS_NAMES])
    y_true = (rng.random((num_exams, len(CLASS_NAMES))) < prevalence).astype(int)
    score = 2.0 * y_true + rng.normal(size=y_true.shape)
    return y_true, 1.0 / (1.0 + np.exp(-(0.3 * score - 3.0)))


def macro_f1_at_half(y_true: np.ndarray, probs: np.ndarray) -> float:
    decisions = (probs >= 0.5).astype(int)
    return float(np.mean([f1_score(y_true[:, c], decisions[:, c], zero_division=0) for c in range(18)]))


def test_calibration_keeps_auroc_and_improves_f1_on_held_out_cases() -> None:
    y_valid, probs_valid = miscalibrated_set(1500, seed=0)
    y_test, probs_test = miscalibrated_set(1500, seed=1)
    calibration = fit_calibration(y_valid, probs_valid)
    calibrated_test = calibration.apply(probs_test)

    assert calibration.method == "platt+f1-threshold"
    assert (calibration.slope > 0).all()
    for c in range(18):
        assert roc_auc_score(y_test[:, c], calibrated_test[:, c]) == pytest.approx(
            roc_auc_score(y_test[:, c], probs_test[:, c]), abs=1e-12
        )
    raw_f1, calibrated_f1 = macro_f1_at_half(y_test, probs_test), macro_f1_at_half(y_test, calibrated_test)
    assert raw_f1 < 0.05  # everything is below 0.5 before calibration
    assert calibrated_f1 > raw_f1 + 0.4


def test_half_is_the_f1_best_cut_on_validation() -> None:
    y_valid, probs_valid = miscalibrated_set(400, seed=2)
    calibrated = fit_calibration(y_valid, probs_valid).apply(probs_valid)
    for c in range(18):
        truth, raw = y_valid[:, c], probs_valid[:, c]
        # Brute force over every cut "raw >= t": F1 = 2·TP / (2·TP + FP + FN), one row per candidate t.
        decisions = raw[None, :] >= np.unique(raw)[:, None]
        tp = (decisions & (truth == 1)).sum(axis=1)
        fp = (decisions & (truth == 0)).sum(axis=1)
        fn = (~decisions & (truth == 1)).sum(axis=1)
        best_f1 = np.max(2 * tp / (2 * tp + fp + fn))
        achieved = f1_score(truth, (calibrated[:, c] >= 0.5).astype(int), zero_division=0)
        assert achieved == pytest.approx(best_f1, abs=1e-12)


def test_single_label_value_class_gets_identity_and_inverted_signal_stays_monotone() -> None:
    y_valid, probs_valid = miscalibrated_set(300, seed=3)
    y_valid[:, 4] = 0  # one label value: nothing to fit
    probs_valid[:, 7] = 1.0 - probs_valid[:, 7]  # a score that ranks negatives first
    calibration = fit_calibration(y_valid, probs_valid)
    assert calibration.slope[4] == 1.0 and calibration.intercept[4] == 0.0
    assert calibration.slope[7] > 0
    calibrated = calibration.apply(probs_valid)
    assert roc_auc_score(y_valid[:, 7], calibrated[:, 7]) == pytest.approx(
        roc_auc_score(y_valid[:, 7], probs_valid[:, 7]), abs=1e-12
    )
    # Strictly increasing wherever float64 can tell values apart (sigmoid rounds to 1.0 above ~1 − 1e-16).
    grid = np.tile(np.linspace(0.001, 0.999, 200)[:, None], (1, 18))
    calibrated_grid = calibration.apply(grid)
    steps = np.diff(calibrated_grid, axis=0)
    assert (steps >= 0).all()
    assert (steps[calibrated_grid[1:] < 1 - 1e-9] > 0).all()


def test_json_round_trip_and_identity() -> None:
    y_valid, probs_valid = miscalibrated_set(300, seed=4)
    calibration = fit_calibration(y_valid, probs_valid)
    restored = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert restored.method == calibration.method
    np.testing.assert_array_equal(restored.slope, calibration.slope)
    np.testing.assert_array_equal(restored.intercept, calibration.intercept)
    np.testing.assert_array_equal(restored.apply(probs_valid), calibration.apply(probs_valid))

    identity = Calibration.identity(18)
    assert identity.method == "identity"
    np.testing.assert_allclose(identity.apply(probs_valid), probs_valid, rtol=1e-12, atol=1e-15)


def test_invalid_calibrations_raise() -> None:
    with pytest.raises(ValueError, match="> 0"):
        Calibration.from_dict({"slope": [1.0, -1.0], "intercept": [0.0, 0.0], "method": "x"})
    with pytest.raises(ValueError, match="intercept"):
        Calibration.from_dict({"slope": [1.0], "method": "x"})
    with pytest.raises(ValueError, match="3 classes"):
        Calibration.identity(3).apply(np.zeros((2, 18)))
    with pytest.raises(ValueError, match="NaN"):
        Calibration.identity(2).apply(np.array([[np.nan, 0.1]]))
    with pytest.raises(ValueError, match="same shape"):
        fit_calibration(np.zeros((4, 2)), np.zeros((4, 3)))


def test_steep_fit_keeps_every_validation_case_apart_and_its_decisions() -> None:
    """Positives within 1e-12 of 1: the Platt slope alone would round several of them onto one float64
    probability (ties change a scorer's AUROC); the fitted map is flattened about 0.5 until they stay apart."""
    rng = np.random.default_rng(0)
    y_valid = np.zeros((40, 1), dtype=int)
    y_valid[:8] = 1
    probs_valid = np.where(y_valid == 1, 1 - 10.0 ** -rng.uniform(1, 12, (40, 1)), rng.uniform(0.001, 0.4, (40, 1)))
    calibration = fit_calibration(y_valid, probs_valid)
    calibrated = calibration.apply(probs_valid)
    order = np.argsort(probs_valid[:, 0])
    assert (np.diff(calibrated[order, 0]) > 0).all()
    shuffled = y_valid.copy()
    shuffled[0, 0], shuffled[30, 0] = 0, 1  # a negative among the top: AUROC < 1, ties would show
    assert roc_auc_score(shuffled[:, 0], calibrated[:, 0]) == roc_auc_score(shuffled[:, 0], probs_valid[:, 0])
    np.testing.assert_array_equal(calibrated >= 0.5, y_valid == 1)  # the F1-best decisions (F1 = 1) are kept


def test_probabilities_below_the_old_clip_stay_apart_and_old_bundles_keep_theirs() -> None:
    tiny = np.array([[1e-12], [1e-10], [1e-8], [0.3]])
    calibration = Calibration(np.array([0.8]), np.array([0.5]))
    assert (np.diff(calibration.apply(tiny)[:, 0]) > 0).all()
    assert calibration.to_dict()["clip"] == 1e-15
    legacy = {key: value for key, value in calibration.to_dict().items() if key != "clip"}
    restored = Calibration.from_dict(legacy)  # a bundle written before the clip was stored used 1e-6
    assert restored.clip == 1e-6
    assert len(np.unique(restored.apply(tiny)[:3])) == 1
