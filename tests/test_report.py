"""The evaluation report writes every file, in the formats other tools read back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ctplatform.evaluation.calibration import fit_calibration
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.report import write_report
from ctplatform.evaluation.results import read_results_json
from ctplatform.labels import CLASS_NAMES

REPORT_FILES = (
    "metrics.json",
    "predictions.csv",
    "per_class.csv",
    "per_class.md",
    "roc_curves.png",
    "pr_curves.png",
    "report.html",
    "results.json",
)


def synthetic_run(num_exams: int = 80, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = (rng.random((num_exams, len(CLASS_NAMES))) < 0.3).astype(int)
    y_true[:, 2] = 0  # one label value: AUROC skipped, plotted as such
    probs = 1.0 / (1.0 + np.exp(-(0.4 * (2.0 * y_true + rng.normal(size=y_true.shape)) - 2.5)))
    names = [f"valid_{i}_a_1.nii.gz" for i in range(num_exams)]
    return names, y_true, probs


def test_calibrated_report_writes_every_file(tmp_path) -> None:
    names, y_true, probs_raw = synthetic_run()
    probs_calibrated = fit_calibration(y_true, probs_raw).apply(probs_raw)
    slice_rng = np.random.default_rng(1)
    slice_level = {"y_true": np.repeat(y_true, 3, axis=0), "probs": slice_rng.random((240, 18))}

    out = tmp_path / "report"
    metrics = write_report(out, names, y_true, probs_raw, probs_calibrated, slice_level=slice_level)
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for png in ("roc_curves.png", "pr_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    written = json.loads((out / "metrics.json").read_text())
    assert written["calibrated"] is True
    assert written["macro"] == pytest.approx(score_predictions(y_true, probs_calibrated)["macro"])
    assert written["uncalibrated"]["macro"] == pytest.approx(score_predictions(y_true, probs_raw)["macro"])
    assert written["slice_level"]["n_exams"] == 240
    assert written["per_class"][CLASS_NAMES[2]]["auroc"] is None
    assert metrics["macro"] == pytest.approx(written["macro"])

    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["VolumeName", *CLASS_NAMES]
    assert [row[0] for row in rows[1:]] == names
    np.testing.assert_allclose(np.array(rows[1:])[:, 1:].astype(float), probs_calibrated, rtol=0, atol=1e-15)

    with open(out / "per_class.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    assert [row["class"] for row in per_class] == list(CLASS_NAMES)
    assert {"auroc", "f1", "support", "f1_uncalibrated", "accuracy_uncalibrated"} <= set(per_class[0])
    markdown = (out / "per_class.md").read_text()
    assert all(name in markdown for name in CLASS_NAMES)

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # ROC, PR, reliability
    assert all(name in page for name in CLASS_NAMES)
    assert "uncalibrated" in page and "Slice level" in page

    result_names, result_probs = read_results_json(out / "results.json")
    assert result_names == [name.removesuffix(".nii.gz") for name in names]
    np.testing.assert_array_equal(result_probs, probs_calibrated)


def test_uncalibrated_report_and_input_checks(tmp_path) -> None:
    names, y_true, probs_raw = synthetic_run(num_exams=30, seed=2)
    metrics = write_report(tmp_path, names, y_true, probs_raw, title="raw <only>")
    assert metrics["calibrated"] is False
    assert metrics["macro"] == metrics["uncalibrated"]["macro"]
    assert "raw &lt;only&gt;" in (tmp_path / "report.html").read_text()
    assert "f1_uncalibrated" not in (tmp_path / "per_class.csv").read_text()

    with pytest.raises(ValueError, match="y_true"):
        write_report(tmp_path, names[:-1], y_true, probs_raw)


def test_auroc_is_the_raw_probabilities_whatever_the_calibration(tmp_path) -> None:
    """Two calibrations on two halves are not one monotone map: their probabilities rank the cases otherwise. The
    report's AUROC stays the model's; F1 and CRG are those of the calibrated decisions."""
    names, y_true, probs_raw = synthetic_run(num_exams=60, seed=3)
    first, second = slice(0, 30), slice(30, 60)
    held_out = np.empty_like(probs_raw)
    held_out[first] = fit_calibration(y_true[second], probs_raw[second]).apply(probs_raw[first])
    held_out[second] = fit_calibration(y_true[first], probs_raw[first]).apply(probs_raw[second])
    assert score_predictions(y_true, held_out)["macro"]["auroc"] != pytest.approx(
        score_predictions(y_true, probs_raw)["macro"]["auroc"], abs=1e-6)  # the disagreement this test is about
    probs_calibrated = fit_calibration(y_true, probs_raw).apply(probs_raw)

    metrics = write_report(tmp_path, names, y_true, probs_raw, probs_calibrated, held_out=held_out)
    raw_auroc = score_predictions(y_true, probs_raw)["macro"]["auroc"]
    assert metrics["macro"]["auroc"] == raw_auroc
    assert metrics["held_out_calibration"]["macro"]["auroc"] == raw_auroc
    assert metrics["held_out_calibration"]["macro"]["f1"] == score_predictions(y_true, held_out)["macro"]["f1"]
    assert metrics["held_out_calibration"]["crg"] == score_predictions(y_true, held_out)["crg"]
    assert "held out (2-fold by patient)" in (tmp_path / "report.html").read_text()
    with pytest.raises(ValueError, match="held_out needs probs_calibrated"):
        write_report(tmp_path, names, y_true, probs_raw, held_out=held_out)
