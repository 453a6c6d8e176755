"""The command line keeps every flag of the original guide (DESIGN.md §5) with its name and meaning."""

import subprocess
import sys
from pathlib import Path

import pytest

from ctplatform.cli import build_parser, config_from_args

GUIDE_FLAGS = [
    "--mode", "both", "--data-dir", "d", "--slice-dir", "s", "--model", "resnet101", "--batch-size", "8",
    "--learning-rate", "0.001", "--epochs", "3", "--gpu-device", "1", "--freeze-backbone", "--progressive-unfreeze",
    "--unfreeze-epoch", "2", "--use-attention", "cbam", "--loss-type", "asl", "--use-advanced-aug",
    "--cutmix-prob", "0.3", "--use-multiscale", "--use-mixed-precision", "--early-stopping-patience", "4",
    "--num-workers", "5", "--checkpoint", "c.ckpt", "--predict-input", "a.nii.gz", "b.mha", "--predict-type",
    "volumes",
]


def test_every_guide_flag_is_accepted_with_its_meaning():
    args = build_parser().parse_args(["run", *GUIDE_FLAGS])
    cfg = config_from_args(args, args.mode)
    assert (cfg.mode, cfg.data_dir, cfg.slice_dir, cfg.model) == ("both", "d", "s", "resnet101")
    assert (cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.gpu_device) == (8, 0.001, 3, 1)
    assert cfg.freeze_backbone and cfg.progressive_unfreeze and cfg.unfreeze_epoch == 2
    assert (cfg.use_attention, cfg.loss_type, cfg.cutmix_prob) == ("cbam", "asl", 0.3)
    assert cfg.use_advanced_aug and cfg.use_multiscale and cfg.use_mixed_precision
    assert (cfg.early_stopping_patience, cfg.num_workers, cfg.checkpoint) == (4, 5, "c.ckpt")
    assert cfg.predict_input == ["a.nii.gz", "b.mha"] and cfg.predict_type == "volumes"


def test_guide_defaults_and_aliases():
    args = build_parser().parse_args(["run", "--model-name", "efficientnet_b0", "--max-epochs", "7"])
    cfg = config_from_args(args, args.mode)
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
