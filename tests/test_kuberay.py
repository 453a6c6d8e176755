"""KubeRay manifests (deploy/kuberay/): the structure that keeps a sweep and the model server correct and locked down.

Plain YAML checks (no Kubernetes needed): API version and kinds, Ray version and image tags against the installed Ray
and this project's version, GPU resources on the worker groups, a head that schedules nothing, token auth from a
Secret reference on every Ray container, a RayJob entrypoint that the real `ctplatform` parser accepts, and a
RayService whose Serve config mirrors platform/serve/serve_config.yaml and passes Ray Serve's own schema.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
SERVE_CONFIG = ROOT / "platform" / "serve" / "serve_config.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
AUTH_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects


def load(name: str) -> dict:
    documents = [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]
    assert len(documents) == 1, name
    return documents[0]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("rayjob-sweep.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load("rayservice-serve.yaml")


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def pod_specs(manifest: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(manifest)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in manifest["spec"]:
        pods.append(("submitter", manifest["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def gpus(container: dict) -> int:
    resources = container.get("resources", {})
    return int(resources.get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.fixture(params=["rayjob-sweep.yaml", "rayservice-serve.yaml"])
def manifest(request) -> dict:
    return load(request.param)


def test_api_version_and_kind(rayjob, rayservice):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")


def test_ray_version_and_images(manifest):
    assert cluster_spec(manifest)["rayVersion"] == ray.__version__
    images = {container["image"] for _, pod in pod_specs(manifest) for container in pod["containers"]}
    assert len(images) == 1, images  # head, workers and submitter run the same build
    tag = images.pop().rsplit(":", 1)[1]
    assert tag == f"{PROJECT['version']}-ray{ray.__version__}-py311-gpu"


def test_image_is_built_on_the_pinned_ray():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M) == [f"rayproject/ray:{ray.__version__}-py311-gpu"]
    assert f'"ray[default,train,tune,serve]=={ray.__version__}"' in dockerfile
    assert f"{PROJECT['name']}-*.whl" in dockerfile
    # Ray workers at the default priority (as the embedded Ray and cluster.yaml run them); Ray's default is 15
    assert re.findall(r"^ENV\s+RAY_worker_niceness=(\S+)", dockerfile, flags=re.M) == ["0"]


def test_head_schedules_nothing_and_has_no_gpu(manifest):
    head = cluster_spec(manifest)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all(gpus(container) == 0 for container in head["template"]["spec"]["containers"])


def test_worker_groups_have_gpus(manifest):
    groups = cluster_spec(manifest)["workerGroupSpecs"]
    assert groups
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert gpus(container) >= 1, group["groupName"]
        requests = container["resources"]["requests"]
        assert int(requests["nvidia.com/gpu"]) == gpus(container)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated


def test_sweep_workers_scale_from_zero(rayjob):
    assert all(group["minReplicas"] == 0 for group in cluster_spec(rayjob)["workerGroupSpecs"])
    assert cluster_spec(rayjob)["enableInTreeAutoscaling"] is True


def test_token_auth_from_a_secret(manifest):
    auth = cluster_spec(manifest)["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]
    for name, pod in pod_specs(manifest):
        env = {item["name"]: item for item in pod["containers"][0].get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{name}: the token must come from a Secret, never inline"
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": AUTH_SECRET_KEY}, name


def test_no_inline_secrets(manifest):
    for name, pod in pod_specs(manifest):
        for container in pod["containers"]:
            for item in container.get("env", []):
                if re.search(r"TOKEN|KEY|SECRET|PASSWORD", item["name"]) and item["name"] != "RAY_AUTH_MODE":
                    assert "value" not in item, f"{name}: {item['name']} is set inline"
    text = yaml.safe_dump(manifest)
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)
    assert "kind: Secret" not in text


def test_volumes_are_declared(manifest):
    for name, pod in pod_specs(manifest):
        declared = {volume["name"] for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{name}: volume {mount['name']} is mounted but not declared"


def test_rayjob_entrypoint_is_a_real_tune_command(rayjob):
    from ctplatform.cli import parse_settings

    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["ctplatform", "tune"]
    args = parse_settings(words[1:])
    assert args.address == "auto"
    assert not args.resume  # a first run; docs/operations.md says how to resume
    assert args.gpus_per_trial >= 1
    # Everything the driver and the trials read or write is on the shared volume (or an object store).
    shared = {mount["mountPath"] for mount in
              cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    for path in (args.storage_path, args.slice_dir):
        assert "://" in path or any(path.startswith(root + "/") for root in shared), path
    # One trial (0.1 CPU) plus its Train worker must fit one GPU pod.
    worker = cluster_spec(rayjob)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert args.cpus_per_worker + 0.1 <= float(worker["resources"]["limits"]["cpu"])
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serve_config(rayservice):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema, as `serve deploy` and KubeRay use it
    # Inside Kubernetes the Service reaches the proxy on the pod IP, so it listens on all interfaces.
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    if SERVE_CONFIG.exists():
        reference = yaml.safe_load(SERVE_CONFIG.read_text())
        assert serve_config["applications"] == reference["applications"], (
            "deploy/kuberay/rayservice-serve.yaml must mirror platform/serve/serve_config.yaml's applications")
        assert serve_config["proxy_location"] == reference.get("proxy_location", serve_config["proxy_location"])
        differing = {key for key in reference.get("http_options", {})
                     if reference["http_options"][key] != serve_config["http_options"].get(key)}
        assert differing <= {"host"}, differing
    for application in serve_config["applications"]:
        module, attribute = application["import_path"].split(":")
        assert module.startswith("ctplatform.serve.")
        source = ROOT / "platform" / "serve" / (module.rsplit(".", 1)[1] + ".py")
        defined = {node.name for node in ast.parse(source.read_text()).body
                   if isinstance(node, ast.FunctionDef | ast.ClassDef)}
        assert attribute in defined, f"{application['import_path']} is not defined in {source}"


def test_rayservice_reads_the_api_key_from_a_secret(rayservice):
    from ctplatform.serve.cli import API_KEY_ENV

    for name, pod in pod_specs(rayservice):
        env = {item["name"]: item for item in pod["containers"][0].get("env", [])}
        key = env[API_KEY_ENV]
        assert "value" not in key and "secretKeyRef" in key["valueFrom"], name
