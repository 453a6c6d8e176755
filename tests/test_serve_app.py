"""The serve layer around the ingress, without a running service: bundle discovery and checks, the CLI
registration, the Serve config file, flags generated from ServeConfig, the serve layer's imports, and the ingress's
own logic (re-preparing for a replica of another version, error mapping and deadline)."""

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from serve_payloads import make_bundle as make_random_bundle

from ctplatform.model.bundle_check import check_bundle
from ctplatform.serve.bundles import bundle_version, chosen_bundle, default_bundle_path
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- body and multipart
# ----------------------------------------------------------------------------------------------- bundles, CLI, config
def make_bundle(path):
    return make_random_bundle(path, image_size=32, num_slices=4, calibrated=False)


def test_default_bundle_is_the_newest_best(tmp_path):
    with pytest.raises(FileNotFoundError, match="--bundle"):
        default_bundle_path(tmp_path / "runs")
    for name, age in (("old", 100), ("new", 0)):
        folder = tmp_path / "runs" / name / "best"
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
        os.utime(folder / "metadata.json", (time.time() - age, time.time() - age))
    assert default_bundle_path(tmp_path / "runs") == tmp_path / "runs" / "new" / "best"


def test_bundle_metadata_and_version(tmp_path):
    from ctplatform.model.bundle import BundleError

    bundle = make_bundle(tmp_path / "b")
    assert check_bundle(chosen_bundle(bundle)).metadata["preprocess"]["image_size"] == 32
    version = bundle_version(bundle)
    assert version.startswith("sha256:") and version == bundle_version(bundle / "metadata.json")
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="class_names differ"):
        check_bundle(bundle)
    with pytest.raises(BundleError, match="no such bundle"):
        chosen_bundle(tmp_path / "missing")


def test_cli_registers_serve_and_errors_without_a_bundle(tmp_path):
    from ctplatform.cli import main, parse_settings

    args = parse_settings(["serve", "--bundle", "b", "--model-replicas", "1:4", "--num-gpus", "0.5"])
    assert args.model_replicas == (1, 4) and args.num_gpus == 0.5 and args.host == "127.0.0.1" and args.port == 8000
    with pytest.raises(SystemExit):
        parse_settings(["serve", "--model-replicas", "4:1"])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["serve"]) == 2  # no ./runs/*/best: a clear error before Ray starts
    finally:
        os.chdir(cwd)


def test_api_key_from_environment(monkeypatch):
    from ctplatform.cli import parse_settings
    from ctplatform.config.cli_args import to_yaml

    monkeypatch.setenv("CTPLATFORM_API_KEY", "s3cret")
    assert parse_settings(["serve"]).api_key == "s3cret"
    assert parse_settings(["serve", "--api-key", "other"]).api_key == "other"
    assert "s3cret" not in to_yaml(parse_settings(["serve"]))  # --print-config never shows the key
    monkeypatch.delenv("CTPLATFORM_API_KEY")
    assert parse_settings(["serve"]).api_key is None


def test_serve_config_is_valid_and_builds(tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from ctplatform.serve.app import app_builder
    from ctplatform.serve.auth import hash_api_key

    config = yaml.safe_load((ROOT / "platform" / "serve" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app_config,) = config["applications"]
    assert app_config["import_path"] == "ctplatform.serve.app:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["request_timeout_s"] > 0
    assert app_config["args"]["num_gpus"] > 0
    model_override = next(d for d in app_config["deployments"] if d["name"] == "ModelServer")
    assert model_override["autoscaling_config"]["max_replicas"] > 1 and model_override["max_queued_requests"] > 0
    args = {**app_config["args"], "bundle": str(make_bundle(tmp_path / "b"))}
    monkeypatch.setenv("CTPLATFORM_API_KEY", "k")
    app = app_builder(args)
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    options = ingress.init_args[2]
    assert options.api_key_sha256 == hash_api_key("k") and options.limits.max_voxels == 1024 * 1024 * 400
    model = ingress.init_args[0]._bound_deployment
    assert model.name == "ModelServer" and model.ray_actor_options["num_gpus"] == 0.5
    assert "num_replicas" not in model._deployment_config.user_configured_option_names  # the config's autoscaling
    assert {d["name"] for d in app_config["deployments"]} == {model.name, ingress.name}  # the overrides find them
    # a hash in the file is the key: the environment's key is not applied as well
    app = app_builder({**args, "api_key_sha256": hash_api_key("file-key").upper()})
    assert app._bound_deployment.init_args[2].api_key_sha256 == hash_api_key("file-key")
    with pytest.raises(ValueError, match="unknown serve configuration keys: limits"):
        app_builder({**args, "limits": {"max_voxels": 1}})


def test_build_app_settings(tmp_path):
    from ctplatform.config.serve import ServeConfig
    from ctplatform.serve.app import build_app

    bundle = str(make_bundle(tmp_path / "b"))
    app = build_app(ServeConfig(bundle=bundle, api_key="correct-horse-battery", num_gpus=0.25, model_replicas=(1, 3),
                                max_queued=5, max_body_mb=8, no_batching=True, batch_wait_ms=20))
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model.ray_actor_options["num_gpus"] == 0.25
    assert model._deployment_config.autoscaling_config.max_replicas == 3
    assert ingress._deployment_config.max_queued_requests == 5 and ingress.num_replicas == 1
    assert "correct-horse-battery" not in repr(ingress.init_args)  # only the key's hash is in the deployment config
    assert ingress.init_args[2].limits.max_body_bytes == 8 << 20
    assert model.init_kwargs["batching"] is False and model.init_kwargs["batch_wait_timeout_s"] == 0.02
    with pytest.raises(ValueError, match="empty API key"):
        build_app(ServeConfig(bundle=bundle, api_key=" "))
    with pytest.raises(ValueError, match="1 <= min <= max"):
        build_app(ServeConfig(bundle=bundle, api_key=None, ingress_replicas=(3, 1)))


def test_serve_flags_are_generated_from_serve_config(monkeypatch):
    """One flag per ServeConfig field meant for the command line, named after it, and nothing else."""
    import argparse

    from ctplatform.cli import build_parser
    from ctplatform.config.serve import ServeConfig

    monkeypatch.delenv("CTPLATFORM_API_KEY", raising=False)
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {a.dest: a for a in subparsers.choices["serve"]._actions
             if a.dest not in ("help", "config", "print_config")}
    fields = {f.name: f for f in dataclasses.fields(ServeConfig) if f.metadata["cli"]}
    assert set(flags) == set(fields)
    for name, action in flags.items():
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert fields[name].metadata["help"] in action.help, name
    assert ServeLimits.from_config(ServeConfig()) == ServeLimits()  # the same limits whichever way the service starts
    monkeypatch.setenv("CTPLATFORM_API_KEY", "s3cret")
    config = ServeConfig()
    assert config.api_key == "s3cret" and "s3cret" not in repr(config)


def test_serve_command_builds_its_config_from_the_flags(monkeypatch):
    from ctplatform.cli import parse_settings

    monkeypatch.setenv("CTPLATFORM_API_KEY", "")  # set but empty: no key, as an empty --api-key
    config = parse_settings(["serve", "--bundle", "b", "--model-replicas", "1:4", "--no-batching",
                             "--max-body-mb", "8", "--max-ongoing", "3"])
    assert config.bundle == "b" and config.model_replicas == (1, 4) and config.no_batching
    assert config.max_body_mb == 8 and config.max_ongoing == 3 and config.api_key is None
    assert config.host == "127.0.0.1" and config.validate() is config


def test_serve_imports_no_training_tuning_or_lightning():
    code = ("import sys, ctplatform.serve.app, ctplatform.serve.cli, ctplatform.serve.inputs; "
            "bad = [m for m in sys.modules if m.startswith(('ctplatform.train', 'ctplatform.tune', 'ray.tune', "
            "'lightning', 'pytorch_lightning'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    code = ("import sys, ctplatform.serve.inputs, ctplatform.serve.thumbnails, ctplatform.serve.preprocessing, "
            "ctplatform.serve.responses, ctplatform.serve.page, ctplatform.config.serve; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _bare_ingress(model, image_size=64):
    """The ingress class without Serve around it (its helpers are plain async methods)."""
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.serve.ingress import Ingress, IngressOptions

    cls = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's wrapper
    ingress = cls.__new__(cls)
    cls.__init__(ingress, model, PreprocessSettings(image_size=image_size, num_slices=8).to_dict(), IngressOptions())
    return ingress


class _FakeModel:
    """A model handle whose replica prepares slices at `size` px (as one of the other version would, mid-rollout)."""

    def __init__(self, size):
        from ctplatform.data.preprocess import PreprocessSettings

        self.size, self.calls = size, []
        self.settings = PreprocessSettings(image_size=size, num_slices=8).to_dict()
        self.predict_volume = self

    def remote(self, *args):
        self.calls.append(args[-1]["image_size"])

        async def reply():
            if args[-1]["image_size"] != self.size:
                return {"status": "preprocess_mismatch", "preprocess": self.settings}
            return {"status": "ok", "model_version": "v"}

        return reply()


def test_ingress_prepares_again_for_a_model_replica_of_another_version():
    from fastapi import HTTPException

    model = _FakeModel(size=48)
    ingress = _bare_ingress(model)
    prepared = []
    reply, out = asyncio.run(ingress._model_call_with_settings(
        "predict_volume", lambda s: (prepared.append(s.image_size), s.image_size)))
    assert reply["status"] == "ok" and out[1] == 48
    assert model.calls == [64, 48] and prepared == [64, 48] and ingress.settings.image_size == 48
    assert ingress.responses["preprocess_retries"] == 1

    class Flapping(_FakeModel):  # always answers with the other size: give up with a 503, never loop
        def remote(self, *args):
            self.size = 64 if args[-1]["image_size"] == 48 else 48
            return super().remote(*args)

    ingress = _bare_ingress(Flapping(size=48))
    with pytest.raises(HTTPException) as info:
        asyncio.run(ingress._model_call_with_settings("predict_volume", lambda s: (s.image_size,)))
    assert info.value.status_code == 503


def test_ingress_error_mapping_and_deadline():
    from fastapi import HTTPException

    ingress = _bare_ingress(_FakeModel(size=64))

    async def refuse():
        raise InputError(415, "not a volume")

    async def crash():
        raise KeyError("bug")

    async def slow():
        await asyncio.sleep(5)

    object.__setattr__(ingress.options, "request_timeout_s", 0.2)
    for work, status in ((refuse, 415), (crash, 500), (slow, 504)):
        with pytest.raises(HTTPException) as info:
            asyncio.run(ingress._guard(work()))
        assert info.value.status_code == status and info.value.detail
    assert ingress.responses == {"415": 1, "500": 1, "504": 1}
