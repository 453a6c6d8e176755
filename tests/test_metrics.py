"""Official VLM3D Task 2 scoring checked against scikit-learn computed here, and the file formats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ctplatform.evaluation.evaluate import score_files
from ctplatform.evaluation.metrics import crg_score, score_predictions
from ctplatform.evaluation.results import read_predictions_csv, read_results_json, write_results_json
from ctplatform.labels import CLASS_NAMES, volume_stem

SKIPPED_CLASS = 5  # all-negative column in the random set: AUROC undefined


def random_labels_and_probs(num_exams: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = (rng.random((num_exams, len(CLASS_NAMES))) < 0.3).astype(int)
    y_true[:, SKIPPED_CLASS] = 0
    y_true[0, 0] = 1  # make sure other classes have both values
    y_true[1, 0] = 0
    probs = np.clip(0.35 * y_true + rng.random(y_true.shape) * 0.7, 0, 1)
    probs[2, 3] = 0.5  # exactly on the threshold: decided positive
    return y_true, probs


def assert_metrics_close(actual: dict, expected: dict) -> None:
    """Nested metric dicts equal up to float rounding (the CSV round trip may move a probability by 1 ulp)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_metrics_close(actual[key], value)
        elif value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-12), key


def test_every_metric_matches_sklearn() -> None:
    y_true, probs = random_labels_and_probs()
    result = score_predictions(y_true, probs)

    assert result["n_exams"] == 120
    assert result["threshold"] == 0.5
    assert list(result["per_class"]) == list(CLASS_NAMES)
    aurocs = []
    for index, name in enumerate(CLASS_NAMES):
        truth, decided = y_true[:, index], (probs[:, index] >= 0.5).astype(int)
        scores = result["per_class"][name]
        if index == SKIPPED_CLASS:
            assert scores["auroc"] is None
        else:
            expected_auroc = roc_auc_score(truth, probs[:, index])
            aurocs.append(expected_auroc)
            assert scores["auroc"] == pytest.approx(expected_auroc, abs=1e-12)
        expected_precision = precision_score(truth, decided, zero_division=0)
        assert scores["precision"] == pytest.approx(expected_precision, abs=1e-12)
        assert scores["recall"] == pytest.approx(recall_score(truth, decided, zero_division=0), abs=1e-12)
        assert scores["f1"] == pytest.approx(f1_score(truth, decided, zero_division=0), abs=1e-12)
        assert scores["accuracy"] == pytest.approx(accuracy_score(truth, decided), abs=1e-12)
        assert scores["support"] == int(truth.sum())
        assert scores["n"] == 120

    # Macro: the skipped class is left out of AUROC only; the others are plain means over all 18 classes.
    assert len(aurocs) == 17
    assert result["macro"]["auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    decisions = (probs >= 0.5).astype(int)
    for metric, function in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        expected = np.mean([function(y_true[:, c], decisions[:, c], zero_division=0) for c in range(18)])
        assert result["macro"][metric] == pytest.approx(expected, abs=1e-12)
    expected_accuracy = np.mean([accuracy_score(y_true[:, c], decisions[:, c]) for c in range(18)])
    assert result["macro"]["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)

    # Strict JSON: the skipped AUROC is null, never NaN.
    json.dumps(result, allow_nan=False)


def test_threshold_is_inclusive() -> None:
    y_true = np.array([[1], [0]])
    result = score_predictions(y_true, np.array([[0.5], [0.4999]]), class_names=["a"])
    assert result["crg"]["tp"] == 1 and result["crg"]["fp"] == 0


def test_crg_hand_computed_two_exams_three_classes() -> None:
    y_true = np.array([[1, 0, 0], [1, 1, 0]])
    probs = np.array([[0.9, 0.6, 0.1], [0.4, 0.7, 0.2]])
    # Decisions at p >= 0.5: [[1, 1, 0], [0, 1, 0]]
    #   TP: (exam0, class0), (exam1, class1)       -> 2
    #   FN: (exam1, class0)                         -> 1
    #   FP: (exam0, class1)                         -> 1
    # X = 3 classes · 2 exams = 6, A = 3 positives
    # r = (6 − 3) / (2·3) = 0.5, U = (6 − 3) / 2 = 1.5
    # s = 0.5·2 − 0.5·1 − 1 = −0.5
    # CRG = 1.5 / (2·1.5 − (−0.5)) = 1.5 / 3.5 = 3/7
    result = score_predictions(y_true, probs, class_names=["a", "b", "c"])
    assert result["crg"] == pytest.approx(
        {"tp": 2, "fn": 1, "fp": 1, "X": 6, "A": 3, "r": 0.5, "U": 1.5, "s": -0.5, "crg": 3 / 7}
    )
    assert result["crg"]["crg"] == pytest.approx(0.4285714285714, abs=1e-12)


def test_crg_extremes() -> None:
    y_true = np.array([[1, 0, 0], [1, 1, 0]])
    assert crg_score(y_true, y_true)["crg"] == pytest.approx(1.0)
    # All negative: TP = 0, FN = A, FP = 0 -> s = −r·A = −U -> CRG = U / 3U
    assert crg_score(y_true, np.zeros_like(y_true))["crg"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="A == 0"):
        crg_score(np.zeros((2, 3), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="no positive labels"):
        score_predictions(np.zeros((2, 3), int), np.full((2, 3), 0.2), class_names=["a", "b", "c"])


@pytest.mark.parametrize(
    ("y_true", "probs", "message"),
    [
        (np.zeros((4, 18)), np.zeros((4, 17)), "differ"),
        (np.zeros(18), np.zeros(18), "2-D"),
        (np.ones((4, 3)), np.zeros((4, 3)), "class_names has 18"),
        (np.full((4, 18), 2), np.zeros((4, 18)), "only 0 and 1"),
        (np.eye(4, 18), np.full((4, 18), np.nan), "NaN"),
        (np.eye(4, 18), np.full((4, 18), 3.0), r"\[0, 1\]"),
    ],
)
def test_invalid_inputs_raise(y_true: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_predictions(y_true, probs)


def test_volume_stem() -> None:
    assert volume_stem("train_1_a_1.nii.gz") == "train_1_a_1"
    assert volume_stem("valid_3_b_2.nii") == "valid_3_b_2"
    assert volume_stem("0b6c-uuid.mha") == "0b6c-uuid"
    assert volume_stem("train_1_a_1") == "train_1_a_1"


def test_results_json_round_trip_and_exact_format(tmp_path) -> None:
    _, probs = random_labels_and_probs(num_exams=3)
    names = ["train_1_a_1.nii.gz", "valid_2_a_1", "3f1e.mha"]
    path = write_results_json(tmp_path / "results.json", names, probs)

    payload = json.loads(path.read_text())
    assert set(payload) == {"name", "type", "version", "predictions"}
    assert payload["name"] == "Generated probabilities"
    assert payload["type"] == "Abnormality Classification"
    assert payload["version"] == {"major": 1, "minor": 0}
    assert [p["input_image_name"] for p in payload["predictions"]] == ["train_1_a_1", "valid_2_a_1", "3f1e"]
    for entry, row in zip(payload["predictions"], probs, strict=True):
        assert set(entry) == {"input_image_name", "probabilities"}
        assert list(entry["probabilities"]) == list(CLASS_NAMES)
        assert list(entry["probabilities"].values()) == pytest.approx(list(row), abs=0)

    read_names, read_probs = read_results_json(path)
    assert read_names == ["train_1_a_1", "valid_2_a_1", "3f1e"]
    np.testing.assert_array_equal(read_probs, probs)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_results_json_missing_or_misspelled_class_names_case_and_class(tmp_path) -> None:
    _, probs = random_labels_and_probs(num_exams=3)
    path = write_results_json(tmp_path / "results.json", ["case_a", "case_b", "case_c"], probs)
    payload = json.loads(path.read_text())
    del payload["predictions"][1]["probabilities"]["Emphysema"]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="case_b") as error:
        read_results_json(path)
    assert "Emphysema" in str(error.value)

    payload["predictions"][1]["probabilities"]["emphysema"] = 0.3
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="Emphysema"):
        read_results_json(path)


def _write_labels_csv(path, names: list[str], y_true: np.ndarray) -> None:
    table = pd.DataFrame(y_true, columns=list(CLASS_NAMES))
    table.insert(0, "VolumeName", names)
    table.to_csv(path, index=False)


def test_score_files_csv_and_json_aligned_by_name(tmp_path) -> None:
    y_true, probs = random_labels_and_probs(num_exams=40, seed=3)
    names = [f"train_{i}_a_1.nii.gz" for i in range(40)]
    _write_labels_csv(tmp_path / "labels.csv", names, y_true)

    # Predictions: rows shuffled, class columns reversed, extensions dropped, one extra unlabelled case.
    order = np.random.default_rng(1).permutation(40)
    predictions = pd.DataFrame(probs[order][:, ::-1], columns=list(CLASS_NAMES)[::-1])
    predictions.insert(0, "VolumeName", [volume_stem(names[i]) for i in order])
    predictions.loc[len(predictions)] = ["extra_case", *([0.1] * 18)]
    predictions.to_csv(tmp_path / "predictions.csv", index=False)

    read_names, read_probs = read_predictions_csv(tmp_path / "predictions.csv")
    assert read_names[0] == volume_stem(names[order[0]])
    np.testing.assert_allclose(read_probs[0], probs[order[0]], rtol=0, atol=1e-15)

    expected = score_predictions(y_true, probs)
    from_csv = score_files(tmp_path / "labels.csv", tmp_path / "predictions.csv", out_dir=tmp_path / "out")
    assert_metrics_close(from_csv, expected)
    assert_metrics_close(json.loads((tmp_path / "out" / "metrics.json").read_text()), expected)

    write_results_json(tmp_path / "results.json", [names[i] for i in order], probs[order])
    assert_metrics_close(score_files(tmp_path / "labels.csv", tmp_path / "results.json"), expected)


def test_score_files_errors_name_the_missing_case_and_class(tmp_path) -> None:
    y_true, probs = random_labels_and_probs(num_exams=10, seed=4)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(10)]
    _write_labels_csv(tmp_path / "labels.csv", names, y_true)

    predictions = pd.DataFrame(probs, columns=list(CLASS_NAMES))
    predictions.insert(0, "VolumeName", names)
    predictions.drop(index=7).to_csv(tmp_path / "missing_case.csv", index=False)
    with pytest.raises(ValueError, match="valid_7_a_1"):
        score_files(tmp_path / "labels.csv", tmp_path / "missing_case.csv")

    predictions.drop(columns=["Hiatal hernia"]).to_csv(tmp_path / "missing_class.csv", index=False)
    with pytest.raises(ValueError, match="Hiatal hernia"):
        score_files(tmp_path / "labels.csv", tmp_path / "missing_class.csv")
