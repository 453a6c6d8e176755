"""The command line keeps every flag of the original run_task2.py scripts with its name and meaning; flags are
generated from typed settings, per command, with config files."""

import subprocess
import sys
from pathlib import Path

import pytest

from ctplatform.cli import parse_settings

GUIDE_FLAGS = [
    "--mode", "both", "--data-dir", "d", "--slice-dir", "s", "--model", "resnet101", "--batch-size", "8",
    "--learning-rate", "0.001", "--epochs", "3", "--gpu-device", "1", "--freeze-backbone", "--progressive-unfreeze",
    "--unfreeze-epoch", "2", "--use-attention", "cbam", "--loss-type", "asl", "--use-advanced-aug",
    "--cutmix-prob", "0.3", "--use-multiscale", "--use-mixed-precision", "--early-stopping-patience", "4",
    "--num-workers", "5", "--checkpoint", "c.ckpt", "--predict-input", "a.nii.gz", "b.mha", "--predict-type",
    "volumes",
]


def test_every_guide_flag_is_accepted_with_its_meaning():
    cfg = parse_settings(["run", *GUIDE_FLAGS])
    assert (cfg.mode, cfg.data_dir, cfg.slice_dir, cfg.model) == ("both", "d", "s", "resnet101")
    assert (cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.gpu_device) == (8, 0.001, 3, 1)
    assert cfg.freeze_backbone and cfg.progressive_unfreeze and cfg.unfreeze_epoch == 2
    assert (cfg.use_attention, cfg.loss_type, cfg.cutmix_prob) == ("cbam", "asl", 0.3)
    assert cfg.use_advanced_aug and cfg.use_multiscale and cfg.use_mixed_precision
    assert (cfg.early_stopping_patience, cfg.num_workers, cfg.checkpoint) == (4, 5, "c.ckpt")
    assert cfg.predict_input == ["a.nii.gz", "b.mha"] and cfg.predict_type == "volumes"


def test_guide_defaults_and_aliases():
    cfg = parse_settings(["run", "--model-name", "efficientnet_b0", "--max-epochs", "7"])
    assert (cfg.mode, cfg.model, cfg.epochs, cfg.loss_type, cfg.batch_size) == ("both", "efficientnet_b0", 7,
                                                                                  "focal", 32)
    assert (cfg.learning_rate, cfg.focal_alpha, cfg.focal_gamma) == (1e-4, 0.85, 4.0)
    assert (cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip) == (6.0, 1.0, 0.05)


@pytest.mark.parametrize("flag, value, valid", [
    ("--loss-type", "mse", "focal, bce, asl"),
    ("--model", "vit", "resnet50, resnet101, efficientnet_b0"),
    ("--use-attention", "eca", "none, se, cbam"),
    ("--mode", "serve", "train, evaluate, both, predict"),
])
def test_invalid_value_lists_the_valid_ones(flag, value, valid):
    exe = Path(sys.executable).with_name("ctplatform")
    out = subprocess.run([str(exe), "run", flag, value], capture_output=True, text=True)
    assert out.returncode == 2
    for choice in valid.split(", "):
        assert choice in out.stderr


def test_missing_cache_is_a_clear_cli_error(tmp_path):
    exe = Path(sys.executable).with_name("ctplatform")
    out = subprocess.run([str(exe), "prepare", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c"),
                          "--no-ray"], capture_output=True, text=True)
    assert out.returncode == 2 and "no label CSV found" in out.stderr and str(tmp_path) in out.stderr


def test_demo_data_in_parallel_writes_the_data_set(tmp_path):
    exe = Path(sys.executable).with_name("ctplatform")
    out = subprocess.run([str(exe), "demo-data", "--out", str(tmp_path / "d"), "--volumes", "6", "--size",
                          "16x16x8", "--workers", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "d" / "dataset").rglob("*.nii.gz"))) == 6
    bad = subprocess.run([str(exe), "demo-data", "--out", str(tmp_path / "e"), "--workers", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "workers must be an int >= 1" in bad.stderr


def run_cli(*args, env=None):
    exe = Path(sys.executable).with_name("ctplatform")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)


def test_unloadable_weights_stop_training_before_ray_starts(tiny_cache, tmp_path):
    """The weights are checked in the CLI's process: a clear error and exit 2, not a worker traceback wrapped in
    Ray's TrainingFailedError after FailureConfig's retries."""
    import os

    missing = tmp_path / "nowhere" / "encoder.pt"
    out = run_cli("train", "--slice-dir", tiny_cache, "--storage-path", tmp_path / "runs", "--weights", missing,
                  "--epochs", "1")
    assert out.returncode == 2, out.stderr
    assert f"weights file {missing} does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # no run was started
    out = run_cli("tune", "--slice-dir", tiny_cache, "--storage-path", tmp_path / "runs", "--weights", missing)
    assert out.returncode == 2 and f"weights file {missing} does not exist" in out.stderr, out.stderr
    assert not (tmp_path / "runs" / "sweep").exists()
    # ImageNet weights, offline: an empty torch cache and a proxy that refuses every connection
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    out = run_cli("train", "--slice-dir", tiny_cache, "--storage-path", tmp_path / "runs", "--weights", "imagenet",
                  "--model", "efficientnet_b0", "--epochs", "1", env=env)
    assert out.returncode == 2, out.stderr
    assert "ImageNet weights for efficientnet_b0 are not available" in out.stderr and "--weights none" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_score_command_scores_like_scikit_learn_and_names_a_missing_case(tiny_dataset, tmp_path):
    import json

    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from ctplatform.labels import CLASS_NAMES, volume_stem

    labels_csv = tiny_dataset / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    labels = pd.read_csv(labels_csv)
    probabilities = np.random.default_rng(0).random((len(labels), len(CLASS_NAMES)))
    predictions = pd.DataFrame(probabilities, columns=list(CLASS_NAMES))
    predictions.insert(0, "VolumeName", labels["VolumeName"].map(volume_stem))
    predictions.sample(frac=1.0, random_state=0).to_csv(tmp_path / "pred.csv", index=False)  # order must not matter
    out = run_cli("score", "--labels", labels_csv, "--predictions", tmp_path / "pred.csv", "--out", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    truth = labels[list(CLASS_NAMES)].to_numpy()
    scored = [j for j in range(len(CLASS_NAMES)) if 0 < truth[:, j].sum() < len(truth)]
    expected = np.mean([roc_auc_score(truth[:, j], probabilities[:, j]) for j in scored])
    assert json.loads(out.stdout)["macro"]["auroc"] == pytest.approx(expected, abs=1e-9)
    low, high = json.loads(out.stdout)["patient_bootstrap_95ci"]["macro_auroc"]  # patients resampled, 1000 times
    assert low < expected < high and json.loads(out.stdout)["patient_bootstrap_95ci"]["resamples"] == 1000
    written = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert written["macro"]["auroc"] == pytest.approx(expected, abs=1e-9)
    predictions.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    out = run_cli("score", "--labels", labels_csv, "--predictions", tmp_path / "short.csv")
    assert out.returncode == 2 and predictions["VolumeName"].iloc[0] in out.stderr


def test_predict_command_on_slices_prints_and_writes_the_model_s_probabilities(tmp_path):
    import json

    import numpy as np
    import pandas as pd
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.labels import CLASS_NAMES
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet50").eval()
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=32, num_slices=4).to_dict(), aggregation="mean")
    export_bundle(tmp_path / "bundle", model, spec)
    rng = np.random.default_rng(0)
    inputs = []
    for name, size in (("a", 40), ("b", 24)):
        hu = np.full((size, size), -1000, np.int16)
        hu[4:-4, 4:-4] = rng.integers(-900, 400, (size - 8, size - 8))
        np.save(tmp_path / f"{name}.npy", hu)
        inputs.append(tmp_path / f"{name}.npy")
    out = run_cli("predict", "--checkpoint", tmp_path / "bundle", "--predict-type", "slices", "--predict-input",
                  *inputs, "--output", tmp_path / "pred.csv")
    assert out.returncode == 0, out.stderr
    assert all(c in out.stdout for c in CLASS_NAMES) and " a " in out.stdout and " b" in out.stdout
    _, expected = Predictor.from_path(tmp_path / "bundle", device="cpu").predict_slices(
        [np.load(p) for p in inputs])
    table = pd.read_csv(tmp_path / "pred.csv")
    assert list(table["VolumeName"]) == ["a", "b"]
    np.testing.assert_allclose(table[list(CLASS_NAMES)].to_numpy(), expected, atol=1e-6)
    assert (table[[f"{c} (decision)" for c in CLASS_NAMES]].to_numpy() == (expected >= 0.5)).all()
    records = json.loads((tmp_path / "pred.json").read_text())
    assert [r["input"] for r in records] == ["a", "b"]
    pickled = tmp_path / "evil.npy"
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    out = run_cli("predict", "--checkpoint", tmp_path / "bundle", "--predict-type", "slices", "--predict-input",
                  pickled)
    assert out.returncode == 2 and str(pickled) in out.stderr and "pickled" in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_run_trains_evaluates_and_its_report_scores_as_the_score_command_does(tiny_cache, tiny_dataset, tmp_path):
    """The newcomer's one command, `ctplatform run` (--mode both): Ray Train on an embedded local Ray, then the
    report and the bundle. The report's figures are what scikit-learn computes from its predictions.csv, and
    `ctplatform score` on its results.json gives the same."""
    import json

    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from ctplatform.labels import CLASS_NAMES, volume_stem

    # settings from a file written by --print-config, a flag on top: the run folder records what ran
    printed = run_cli("run", "--slice-dir", tiny_cache, "--storage-path", tmp_path / "runs", "--run-name", "e2e",
                      "--model", "resnet50", "--epochs", "3", "--batch-size", "16", "--limit-train-batches", "2",
                      "--num-workers", "0", "--loss-type", "bce", "--learning-rate", "1e-3", "--print-config")
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "a.yaml").write_text(printed.stdout)
    out = run_cli("run", "--config", tmp_path / "a.yaml", "--epochs", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    from ctplatform.cli import parse_settings
    from ctplatform.config import TrainConfig
    from ctplatform.config.options import project

    recorded = parse_settings(["run", "--config", str(tmp_path / "runs" / "e2e" / "config.yaml")])
    ran = project(parse_settings(["run", "--config", str(tmp_path / "a.yaml"), "--epochs", "1"]), TrainConfig)
    assert project(recorded, TrainConfig) == ran.replace(slice_dir=str(Path(tiny_cache).resolve()),
                                                         storage_path=str((tmp_path / "runs").resolve()))
    assert recorded.mode == "both" and recorded.epochs == 1
    printed = [line.split(": ", 1) for line in out.stdout.splitlines()]
    lines = {pair[0]: pair[1] for pair in printed if pair[0] in ("report", "model bundle")}
    report, bundle = Path(lines["report"]).parent, Path(lines["model bundle"])
    for name in ("metrics.json", "predictions.csv", "results.json", "per_class.csv", "per_class.md",
                 "roc_curves.png", "pr_curves.png", "report.html"):
        assert (report / name).is_file(), name
    for png in ("roc_curves.png", "pr_curves.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert {"metadata.json", "model.safetensors"} <= {p.name for p in bundle.iterdir()}

    labels_csv = tiny_dataset / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    labels = pd.read_csv(labels_csv)
    labels["VolumeName"] = labels["VolumeName"].map(volume_stem)
    predictions = pd.read_csv(report / "predictions.csv")
    predictions["VolumeName"] = predictions["VolumeName"].map(volume_stem)
    merged = labels.merge(predictions, on="VolumeName", suffixes=("", " (p)"))
    assert len(merged) == len(labels) == len(predictions)  # every validation volume, once
    truth = merged[list(CLASS_NAMES)].to_numpy()
    probs = merged[[f"{c} (p)" for c in CLASS_NAMES]].to_numpy()
    scored = [j for j in range(len(CLASS_NAMES)) if 0 < truth[:, j].sum() < len(truth)]
    expected = np.mean([roc_auc_score(truth[:, j], probs[:, j]) for j in scored])
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["macro"]["auroc"] == pytest.approx(expected, abs=1e-6)
    assert "slice_level" in metrics and "uncalibrated" in metrics
    scored_out = run_cli("score", "--labels", labels_csv, "--predictions", report / "results.json")
    assert scored_out.returncode == 0, scored_out.stderr
    rescored = json.loads(scored_out.stdout)
    assert rescored["macro"]["auroc"] == pytest.approx(metrics["macro"]["auroc"], abs=1e-6)
    assert rescored["macro"]["f1"] == pytest.approx(metrics["macro"]["f1"], abs=1e-6)
    assert rescored["crg"] == pytest.approx(metrics["crg"]["crg"], abs=1e-6)
