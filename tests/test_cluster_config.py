"""cluster.yaml: valid for Ray's cluster launcher (checked by Ray's own code) and shaped for a secure Ray 2.60 cluster.

Ray's validation is what `ray up` runs before it touches the cloud (ray.autoscaler._private.commands._bootstrap_config):
`prepare_config` fills in the provider's defaults and `validate_config` checks the result against Ray's
ray-schema.json plus its cross-field rules. Nothing here needs cloud credentials or starts Ray.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw) -> dict:
    return yaml.safe_load(raw)


def validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_start(commands: list[str]) -> str:
    starts = [command for command in commands if "ray start" in command]
    assert len(starts) == 1, commands
    return starts[0]


def worker_types(config: dict) -> dict:
    return {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}


def test_ray_accepts_the_config(config):
    prepared = validated(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["provider"]["type"] in ("aws", "gcp")


def test_ray_validation_is_not_a_no_op(config):
    """The same validator rejects a broken copy: a misspelled top-level key, and min_workers above max_workers."""
    broken = copy.deepcopy(config)
    broken["setup_comands"] = []
    with pytest.raises(jsonschema.ValidationError):
        validated(broken)
    broken = copy.deepcopy(config)
    for spec in worker_types(broken).values():
        spec["min_workers"] = broken["max_workers"]
    with pytest.raises(ValueError, match="max_workers"):
        validated(broken)


def test_image_is_the_installed_ray_version(config):
    docker = config["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    for spec in config["available_node_types"].values():
        images.add(spec.get("docker", {}).get("worker_image", docker["image"]))
    assert len(images) == 1, images
    repository, tag = docker["image"].rsplit(":", 1)
    assert repository in ("rayproject/ray", "rayproject/ray-ml")
    assert tag.split("-")[0] == ray.__version__, "the cluster must run exactly the Ray version installed here"
    ray_pin = next(dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("ray["))
    assert ray.__version__ in SpecifierSet(ray_pin.split("]", 1)[1])
    python_tag = re.search(r"-py(\d)(\d+)", tag)
    assert python_tag, "pin the image's Python: Ray needs the same Python minor version on clients and cluster"
    assert f"{python_tag[1]}.{python_tag[2]}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert tag.endswith("-gpu") or repository.endswith("-ml")


def test_head_schedules_no_training(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    start = ray_start(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start
    assert not re.match(r"(g\d|p\d|trn|inf|dl)", head["node_config"]["InstanceType"]), "the head needs no GPU"


def test_gpu_workers_autoscale_from_zero(config):
    workers = worker_types(config)
    assert workers
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert spec["max_workers"] >= 1, name
        assert spec["resources"]["GPU"] >= 1 and spec["resources"]["CPU"] >= 1, name
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_setup_installs_this_projects_wheel(config):
    remote_dist = next(remote for remote, local in config["file_mounts"].items()
                       if local.rstrip("/") in ("./dist", "dist"))
    installs = [command for command in config["setup_commands"] if "pip install" in command and ".whl" in command]
    assert len(installs) == 1, config["setup_commands"]
    words = shlex.split(installs[0])
    wheel = f"{remote_dist}/{PYPROJECT['project']['name']}-*.whl"
    assert wheel in words, installs[0]
    # Ray is pinned to the image's version, so installing the wheel never swaps the cluster's Ray.
    assert any(re.fullmatch(rf"ray(\[[a-z,]+\])?=={re.escape(ray.__version__)}", word) for word in words), words
    assert "working_dir" not in yaml.safe_dump(config), "ship the package as a wheel, not a working_dir"


def test_token_auth_on_every_node(config):
    token_mount = "~/.ray/auth_token"
    local_token = config["file_mounts"][token_mount]
    local_path = Path(os.path.expanduser(local_token)).resolve()
    assert ROOT not in local_path.parents, "the token file must live outside the repository"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = ray_start(commands)
        assert "RAY_AUTH_MODE=token" in start, start
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in start, start
        assert start.index("RAY_AUTH_MODE=token") < start.index("ray start")
    run_options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in run_options
    assert "-e RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token" in run_options


def test_ray_workers_run_at_default_priority(config):
    # as the embedded Ray does (ctplatform.ray_session.WORKER_NICENESS); Ray's own default is 15
    assert "-e RAY_worker_niceness=0" in config["docker"]["run_options"]


def test_dashboard_is_loopback_only(config):
    head_start = ray_start(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    every_command = [command for key, value in config.items() if key.endswith("commands") for command in value]
    assert not any("0.0.0.0" in command for command in every_command)


def test_no_secrets_in_the_file(config, raw):
    patterns = {
        "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        "AWS secret key setting": r"(?i)aws_secret_access_key|secret_access_key\s*[:=]",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "inline Ray token": r"RAY_AUTH_TOKEN\s*=\s*[^$\s]",
        "long hex string (a token?)": r"\b[0-9a-fA-F]{32,}\b",
        "password": r"(?i)password\s*[:=]",
    }
    found = {name: re.findall(pattern, raw) for name, pattern in patterns.items()}
    assert not any(found.values()), found
    assert "ssh_private_key" not in config.get("auth", {})


def doc_cli_uses(text: str) -> list[str]:
    """`ctplatform ...` commands in the shell blocks of a Markdown text: at a line's start, after `-- ` (ray job
    submit), or inside a quoted remote command (ray exec); line continuations joined."""
    uses = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for match in re.finditer(r"(?:^|\s|[\"'])(ctplatform\s[^\"']*)", line):
                uses.append(match[1].strip())
    return uses


def test_operations_doc_uses_the_real_cli():
    """Every `ctplatform ...` command in docs/operations.md parses with the real argument parser."""
    import dataclasses

    from ctplatform.cli import parse_settings

    uses = doc_cli_uses((ROOT / "docs" / "operations.md").read_text())
    commands = {shlex.split(use)[1] for use in uses}
    assert {"tune", "serve", "prepare"} <= commands, uses
    sweeps = []
    for use in uses:
        try:
            settings = parse_settings(shlex.split(use)[1:])
        except SystemExit:
            pytest.fail(f"docs/operations.md: `{use}` does not parse with ctplatform's own parser")
        if shlex.split(use)[1] == "tune":
            assert settings.address == "auto", use  # a job on the cluster joins that cluster
            assert settings.slice_dir in CLUSTER_YAML.read_text(), "the slice cache path cluster.yaml sets up"
            sweeps.append(dataclasses.asdict(settings))
    # The resume command repeats the sweep's command with --resume added, nothing else changed.
    first = [sweep for sweep in sweeps if not sweep["resume"]]
    resumed = [sweep for sweep in sweeps if sweep["resume"]]
    assert first and resumed
    for sweep in resumed:
        assert {**sweep, "resume": False} in first
