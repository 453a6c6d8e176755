"""Settings per command: generated flags, per-command help, config files and the original scripts' command lines."""

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctplatform.cli import build_parser, parse_settings
from ctplatform.config import TrainConfig
from ctplatform.config.options import project

HERE = Path(__file__).parent
EXE = Path(sys.executable).with_name("ctplatform")
pytestmark = pytest.mark.timeout(120)


# evaluation settings added after the recording (confidence intervals and subgroups): every old command line gets
# their defaults
ADDED_SINCE = {"subgroup_metadata": None, "bootstrap_resamples": 1000, "bootstrap_seed": 0, "min_group_patients": 30,
               # LoRA and per-block checkpointing (off by default: the guide's commands train as before)
               "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": "auto",
               "grad_checkpoint": False,
               # the node-local copy of a slice cache in a bucket
               "local_cache_gb": 50.0}


def test_every_command_line_of_the_original_scripts_parses_to_the_same_settings():
    """tests/data/guide_command_settings.json holds every command line of the original run_task2.py scripts and
    the TrainConfig (prediction fields included) that the hand-written parser before the generated one gave."""
    cases = json.loads((HERE / "data" / "guide_command_settings.json").read_text())
    assert len(cases) == 26
    for case in cases:
        argv = shlex.split(case["command"])[2:]  # drop "python run_task2.py"
        settings = dataclasses.asdict(parse_settings(["run", *argv]))
        for name, value in case["settings"].items():
            assert settings[name] == value, (case["command"], name)
        assert set(settings) == set(case["settings"]) | set(ADDED_SINCE), case["command"]
        assert {name: settings[name] for name in ADDED_SINCE} == ADDED_SINCE, case["command"]


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


def test_each_command_lists_only_its_own_flags():
    tune, train, predict, serve = _flags("tune"), _flags("train"), _flags("predict"), _flags("serve")
    prediction = {"--predict-input", "--predict-type", "--predict-metadata", "--output", "--checkpoint"}
    assert not tune & prediction and not train & prediction
    assert {"--num-samples", "--grace-period", "--loss-type", "--model-name", "--max-epochs"} <= tune
    assert prediction <= predict and not predict & {"--loss-type", "--epochs", "--learning-rate", "--num-samples"}
    assert not serve & {"--loss-type", "--epochs", "--learning-rate", "--batch-size", "--num-samples"}
    out = subprocess.run([str(EXE), "tune", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--predict-input" not in out.stdout
    for group in ("Loss:", "Optimisation:", "Sweep:", "Ray:"):  # grouped by concern
        assert group in out.stdout, group


def test_print_config_then_config_file_reproduces_and_flags_override(tmp_path):
    out = subprocess.run([str(EXE), "run", "--loss-type", "asl", "--learning-rate", "3e-4", "--print-config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / "a.yaml").write_text(out.stdout)
    loaded = yaml.safe_load(out.stdout)
    assert loaded["loss_type"] == "asl" and loaded["learning_rate"] == 3e-4 and loaded["mode"] == "both"
    again = parse_settings(["run", "--config", str(tmp_path / "a.yaml")])
    assert dataclasses.asdict(again) == loaded
    overridden = parse_settings(["run", "--config", str(tmp_path / "a.yaml"), "--epochs", "1", "--cpu"])
    assert (overridden.loss_type, overridden.epochs, overridden.use_gpu) == ("asl", 1, False)
    # a run's config file serves the training commands too (keys of other commands are ignored there)
    tune = parse_settings(["tune", "--config", str(tmp_path / "a.yaml"), "--num-samples", "3"])
    assert (tune.loss_type, tune.learning_rate, tune.num_samples) == ("asl", 3e-4, 3)
    assert project(tune, TrainConfig) == project(again, TrainConfig)


def test_config_file_values_are_typed_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nepochs: '4'\nuse_advanced_aug: true\nlimit_train_batches: 5\n")
    cfg = parse_settings(["train", "--config", str(path)])  # YAML reads 1e-3 as text: still a float here
    assert (cfg.learning_rate, cfg.epochs, cfg.use_advanced_aug, cfg.limit_train_batches) == (1e-3, 4, True, 5)
    assert isinstance(cfg.limit_train_batches, int)
    for text, message, names_the_file in (("loss_typ: bce\n", "unknown setting(s) loss_typ", True),
                                          ("epochs: many\n", "epochs: expected int", True),
                                          ("loss_type: mse\n", "choose one of focal, bce, asl", False)):
        path.write_text(text)
        out = subprocess.run([str(EXE), "train", "--config", str(path)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert (str(path) in out.stderr) == names_the_file and "Traceback" not in out.stderr


def test_required_settings_are_named_when_missing():
    out = subprocess.run([str(EXE), "score", "--labels", "l.csv"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--predictions" in out.stderr


def test_run_names_of_runs_made_before_the_split_are_unchanged():
    """A rerun resumes its run only if the stable run name is the same: these names were computed before the
    settings were split by concern."""
    from ctplatform.train.ray_launcher import stable_run_name

    assert stable_run_name(TrainConfig()) == "resnet50-slice-focal-fd5a7e00"
    assert stable_run_name(TrainConfig(head="attention-mil", loss_type="bce", learning_rate=3e-4)) == \
        "resnet50-attention-mil-bce-7a2e3824"
    old = {**TrainConfig().to_dict(), "mode": "train", "checkpoint": None, "predict_input": [],
           "predict_type": "slices", "predict_metadata": None, "report_dir": None, "output": None}
    assert TrainConfig.from_dict(old) == TrainConfig()  # a sweep folder's stored settings still load
    with pytest.raises(ValueError, match="unknown configuration keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})
