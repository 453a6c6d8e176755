"""`ctplatform compare`: two evaluated runs on the same cases, paired tests, plain verdicts, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctplatform.evaluation.calibration import fit_calibration
from ctplatform.evaluation.compare import compare_runs, format_comparison, holm
from ctplatform.evaluation.delong import delong_paired_test
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.report import write_report
from ctplatform.evaluation.results import write_predictions_csv, write_results_json
from ctplatform.evaluation.run_files import load_run, locate_results
from ctplatform.labels import CLASS_NAMES

pytestmark = pytest.mark.timeout(180)
PATIENTS = 150


def cohort(seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((PATIENTS, len(CLASS_NAMES))) < 0.3).astype(int).repeat(2, axis=0)
    names = [f"valid_{p}_a_{r}.nii.gz" for p in range(PATIENTS) for r in (1, 2)]
    return rng, names, y


def model(rng, y, strength, perfect_class=None):
    logits = strength * y + rng.normal(size=y.shape) - 1.0
    if perfect_class is not None:
        logits[:, perfect_class] = 6.0 * y[:, perfect_class] - 3.0 + 0.1 * rng.normal(size=len(y))
    return 1.0 / (1.0 + np.exp(-logits))


def write_run(root, names, y, probs, **kwargs):
    calibrated = fit_calibration(y, probs).apply(probs)
    write_report(root / "report", names, y, probs, calibrated, bootstrap_resamples=0, **kwargs)
    return root


def write_bare_report(root, names, y, probs):
    """Only what compare reads (a report folder's results.json and labels.csv), without the report's plots."""
    write_results_json(root / "report" / "results.json", names, probs)
    write_predictions_csv(root / "report" / "labels.csv", names, y)
    return root


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A: a fair model, perfect on Cardiomegaly; B: a much weaker one. Each a run folder with its report."""
    root = tmp_path_factory.mktemp("runs")
    rng, names, y = cohort()
    probs_a = model(rng, y, 2.0, perfect_class=CLASS_NAMES.index("Cardiomegaly"))
    probs_b = model(rng, y, 0.6)
    return (write_run(root / "a", names, y, probs_a), write_run(root / "b", names, y, probs_b), names, y,
            probs_a, probs_b)


def test_differences_and_tests_against_independent_references(two_runs):
    run_a, run_b, names, y, probs_a, probs_b = two_runs
    a, b = load_run(run_a), load_run(run_b)
    result = compare_runs(a, b, resamples=300, seed=1)
    macro = result["auroc"]["macro"]
    assert macro["auroc_a"] == pytest.approx(score_predictions(y, probs_a)["macro"]["auroc"], abs=1e-12)
    assert macro["auroc_b"] == pytest.approx(score_predictions(y, probs_b)["macro"]["auroc"], abs=1e-12)
    assert macro["significant"] and macro["p"] < 1e-6 and macro["low"] > 0
    patients = np.repeat(np.arange(PATIENTS), 2)
    tested = []
    for index, name in enumerate(CLASS_NAMES):
        entry = result["auroc"]["per_class"][name]
        reference = delong_paired_test(y[:, index], probs_a[:, index], probs_b[:, index], clusters=patients)
        assert entry["difference"] == pytest.approx(
            roc_auc_score(y[:, index], probs_a[:, index]) - roc_auc_score(y[:, index], probs_b[:, index]), abs=1e-12)
        assert entry["p"] == pytest.approx(reference["p"], rel=1e-9)
        tested.append(entry["p"])
    np.testing.assert_allclose([result["auroc"]["per_class"][n]["p_holm"] for n in CLASS_NAMES], holm(tested))
    assert result["auroc"]["per_class"]["Cardiomegaly"]["significant"]
    f1 = result["macro_f1"]
    assert f1["a"] == pytest.approx(score_predictions(a.labels, a.probs)["macro"]["f1"])  # cases sorted by name
    assert f1["difference"] == pytest.approx(f1["a"] - f1["b"]) and f1["valid_resamples"] == 300
    text = format_comparison(result)
    assert "SIGNIFICANT: A higher" in text and "Cardiomegaly" in text.split("In short:")[1]


def test_a_run_against_itself_is_not_significantly_different(two_runs):
    run_a, *_ = two_runs
    result = compare_runs(load_run(run_a), load_run(run_a / "report" / "results.json"), resamples=100)
    assert result["auroc"]["macro"]["p"] == 1.0 and not result["auroc"]["macro"]["significant"]
    assert not any(entry["significant"] for entry in result["auroc"]["per_class"].values())
    assert result["macro_f1"]["difference"] == 0 and not result["crg"]["significant"]
    assert "no class's AUROC differs significantly" in format_comparison(result)


def test_holm_adjustment_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_every_way_of_naming_a_run_finds_its_report(two_runs, tmp_path):
    run_a, *_ = two_runs
    results = run_a / "report" / "results.json"
    (run_a / "bundle").mkdir(exist_ok=True)
    (run_a / "bundle" / "metadata.json").write_text("{}")
    for named in (run_a, run_a / "report", run_a / "bundle", results):
        assert locate_results(named) == results
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        locate_results(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no evaluation found .*evaluate it first"):
        locate_results(tmp_path / "empty_run")


def test_runs_that_cannot_be_compared_say_why(two_runs, tmp_path):
    run_a, run_b, names, y, probs_a, _ = two_runs
    a = load_run(run_a)
    fewer = tmp_path / "fewer"
    write_bare_report(fewer, names[:-2], y[:-2], probs_a[:-2])
    with pytest.raises(ValueError, match=r"different cases: 0 only in the first, 2 only in the second|"
                                         r"different cases: 2 only in the first \(e.g. valid_"):
        compare_runs(a, load_run(fewer))
    relabelled = tmp_path / "relabelled"
    flipped = y.copy()
    flipped[5, 3] = 1 - flipped[5, 3]
    write_bare_report(relabelled, names, flipped, probs_a)
    with pytest.raises(ValueError, match=r"different labels \(case 'valid_2_a_2', class 'Pericardial effusion'"):
        compare_runs(a, load_run(relabelled))
    other_classes = tmp_path / "other" / "results.json"
    other_classes.parent.mkdir()
    renamed = [("Cardiomegalyy" if c == "Cardiomegaly" else c) for c in CLASS_NAMES]
    write_results_json(other_classes, names, probs_a, renamed)
    with pytest.raises(ValueError, match=r"different label sets \(only in the first: \['Cardiomegaly'\]; only in "
                                         r"the second: \['Cardiomegalyy'\]\)"):
        compare_runs(a, load_run(other_classes))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_a / "report" / "results.json", bare / "results.json")
    with pytest.raises(ValueError, match="pass --labels CSV"):
        compare_runs(load_run(bare / "results.json"), load_run(bare))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctplatform.cli", "compare", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_compare_command_end_to_end(two_runs, tmp_path):
    run_a, run_b, *_ = two_runs
    out = _cli(run_a, run_b / "report", "--bootstrap-resamples", "200", "--out", tmp_path / "cmp.json")
    assert out.returncode == 0, out.stderr
    assert "SIGNIFICANT: A higher" in out.stdout and "macro F1 (paired percentile bootstrap" in out.stdout
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["resamples"] == 200 and written["auroc"]["macro"]["significant"] is True
    # results.json files with the labels given on the command line
    bare = tmp_path / "bare.json"
    shutil.copy(run_b / "report" / "results.json", bare)
    out = _cli(bare, run_b / "report" / "results.json", "--labels", run_a / "report" / "labels.csv",
               "--bootstrap-resamples", "50")
    assert out.returncode == 0, out.stderr
    assert "no class's AUROC differs significantly" in out.stdout
    out = _cli(run_a, tmp_path / "missing")
    assert out.returncode == 2 and "missing: no such file or folder" in out.stderr and "Traceback" not in out.stderr
