"""The AnyMC3D recipe end to end: `ctplatform run --config configs/anymc3d.yaml --weights none` (a tiny timm ViT in
place of DINOv2, LoRA, attention-MIL pooling) trains on Ray Train, exports a bundle with the adapters merged, and
that bundle is served over HTTP by Ray Serve with the probabilities the offline predictor gives."""

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from local_server import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(420)
def test_anymc3d_config_trains_exports_a_merged_bundle_and_serves_it(tiny_cache, tiny_dataset, tmp_path):
    import ray
    from ray import serve

    from ctplatform.config.serve import ServeConfig
    from ctplatform.data import read_volume
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.model.bundle_check import check_bundle, validated_metadata
    from ctplatform.serve.app import build_app

    out = subprocess.run(
        [sys.executable, "-m", "ctplatform.cli", "run", "--config", str(REPO / "configs" / "anymc3d.yaml"),
         "--weights", "none", "--model", "test_vit", "--slice-dir", str(tiny_cache), "--storage-path",
         str(tmp_path / "runs"), "--run-name", "anymc3d", "--epochs", "1", "--batch-size", "16", "--mil-slices", "8",
         "--limit-train-batches", "2", "--num-workers", "0", "--cpu", "--bootstrap-resamples", "20"],
        capture_output=True, text=True, timeout=360)
    assert out.returncode == 0, out.stderr[-3000:]
    recorded = (tmp_path / "runs" / "anymc3d" / "config.yaml").read_text()
    assert "lora_rank: 8" in recorded and "head: attention-mil" in recorded and "grad_checkpoint: true" in recorded
    bundle = Path(next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("model bundle")))
    check_bundle(bundle)
    architecture = validated_metadata(bundle / "metadata.json")["architecture"]
    assert architecture["model"] == "test_vit" and architecture["head"] == "attention-mil"
    assert not any(key.startswith("lora") for key in architecture)  # merged: the plain architecture

    volume_file = sorted(tiny_dataset.rglob("*.nii.gz"))[0]
    data = volume_file.read_bytes()
    volume = read_volume(data, name=volume_file.name)
    expected = Predictor.from_path(bundle, device="cpu").predict_volume(volume.hu, volume.notes).to_dict()

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(build_app(ServeConfig(bundle=str(bundle), api_key=None, model_cpus=0.5, ingress_cpus=0.5)),
                  name="anymc3d", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            response = client.post("/v1/predict/volume", files={"file": (volume_file.name, data)})
            assert response.status_code == 200, response.text
            served = response.json()
            assert client.get("/v1/model").json()["architecture"]["model"] == "test_vit"
    finally:
        serve.shutdown()
        ray.shutdown()
    np.testing.assert_allclose([served["raw_probabilities"][c] for c in expected["raw_probabilities"]],
                               list(expected["raw_probabilities"].values()), atol=1e-5, rtol=0)
    assert set(served["slice_attention"]) == set(expected["probabilities"])  # attention pooling over the slices
