"""The HTTP service over real HTTP against a real Serve application on a local Ray.

One module-scoped application (a random-weight efficientnet_b0 bundle at 64 px, 8 slices) serves every test; the
rolling update, which swaps in a second bundle, runs last. Run with the Ray lock held:
`flock /tmp/ray-tests.lock .venv/bin/pytest tests/test_serve.py`.
"""

import asyncio
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import zlib

import httpx
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "test-key-5f1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "ctplatform"
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------- inputs
def chest(shape=(40, 64, 56), seed=0):
    """(slices, rows, cols) HU: air, an elliptic body with two lungs and bright nodules, noise: slices differ."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.42)) ** 2 < 1
    body &= (z > 3) & (z < shape[0] - 3)
    hu[body] = 40
    hu[body & (np.abs(x - shape[2] / 2) > 3) & (np.abs(y - shape[1] / 2) < shape[1] * 0.25)] = -850
    for _ in range(12):
        cz, cy, cx = rng.integers(4, shape[0] - 4), rng.integers(10, shape[1] - 10), rng.integers(10, shape[2] - 10)
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < rng.integers(4, 30)] = rng.uniform(-100, 900)
    return np.rint(hu + rng.normal(0, 25, shape)).astype(np.float32)


def nifti_gz(hu, zooms=None, dtype=np.int16):
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(dtype), np.diag([-0.7, -0.7, 2, 1.0]))
    if zooms is not None:
        img.header.set_zooms(zooms)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def mha_bytes(hu, tmp_path):
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 1.5))
    path = tmp_path / "scan.mha"
    sitk.WriteImage(image, str(path), useCompression=True)
    return path.read_bytes()


def npy(array, **kwargs):
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def gzip_bomb(shape_xyz, zeros=48 * MiB):
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(np.int16)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(header.binaryblock + b"\x00" * 4)]
    parts += [compressor.compress(bytes(4 * MiB)) for _ in range(zeros // (4 * MiB))]
    return b"".join(parts) + compressor.flush()


def terabyte_header():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\x00" * 4)


# ----------------------------------------------------------------------------------------------- the service
def make_bundle(path, seed, image_size=64):
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.calibration import Calibration
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(seed)
    model = build_classifier("efficientnet_b0", num_classes=18)
    with torch.no_grad():  # spread the random head's outputs so probabilities differ between slices and classes
        model.head.weight.mul_(60.0)
        model.head.bias.uniform_(-1.0, 1.0)
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=8).to_dict(),
                     aggregation="topk", topk=3,
                     calibration=Calibration(np.full(18, 1.3), np.linspace(-1.5, 1.5, 18)),
                     metrics={"macro": {"auroc": 0.5}}, source={"run_name": f"test-{seed}"})
    return export_bundle(path, model, spec)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_options():
    """ServeConfig fields of the test service (a float32 128 x 128 x 96 volume is the most it decompresses)."""
    return dict(api_key=KEY, model_cpus=0.5, ingress_cpus=0.5, max_batch_slices=32, batch_wait_ms=50.0,
                request_timeout=30.0, max_ongoing=4, max_queued=4, max_body_mb=8, max_voxels=128 * 128 * 96,
                max_decompressed_mb=128 * 128 * 96 * 4 / MiB, max_slices=64)


def app_config(bundle, **changes):
    from ctplatform.config.serve import ServeConfig

    return ServeConfig(bundle=str(bundle), **{**app_options(), **changes})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from ctplatform.serve.app import build_app
    from ctplatform.serve.bundles import bundle_version

    root = tmp_path_factory.mktemp("serve")
    # b also prepares slices differently (48 px): mid-rollout, an ingress of one version meets a model replica of
    # the other, which the service must absorb without failing the request
    bundles = {"a": make_bundle(root / "a", seed=0), "b": make_bundle(root / "b", seed=1, image_size=48)}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(build_app(app_config(bundles["a"])), name=APP, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield {"client": client, "port": port, "url": f"http://127.0.0.1:{port}", "bundles": bundles,
                   "versions": {k: bundle_version(v) for k, v in bundles.items()}, "root": root}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def offline(service):
    from ctplatform.evaluation.predictor import Predictor

    return Predictor.from_path(service["bundles"]["a"], device="cpu")


def post_volume(client, data, name="scan.nii.gz", headers=AUTH, **params):
    return client.post("/v1/predict/volume", files={"file": (name, data)}, headers=headers, params=params)


def assert_good_request_works(client):
    response = post_volume(client, nifti_gz(chest(seed=3)))
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------- tests
def test_liveness_readiness_docs_and_model_info(service):
    client = service["client"]
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"] == service["versions"]["a"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict/volume", "/v1/predict/slices", "/v1/model", "/v1/stats", "/healthz", "/readyz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict/volume"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    info = client.get("/v1/model", headers=AUTH).json()
    from ctplatform.labels import CLASS_NAMES

    assert info["class_names"] == list(CLASS_NAMES) and info["model_version"] == service["versions"]["a"]
    assert len(info["calibration"]["intercept"]) == 18 and info["metrics"] == {"macro": {"auroc": 0.5}}
    assert info["preprocess"]["image_size"] == 64 and info["input"]["windows"] == "three"
    assert info["serving"]["device"] == "cpu" and info["limits"]["max_body_bytes"] == 8 * MiB


def test_volume_probabilities_equal_offline_predictor(service, offline, tmp_path):
    from ctplatform.data import read_volume

    hu = chest(seed=1)
    for data, name in ((nifti_gz(hu), "scan.nii.gz"), (mha_bytes(hu, tmp_path), "scan.mha")):
        response = post_volume(service["client"], data, name, thumbnails="true")
        assert response.status_code == 200, response.text
        served = response.json()
        volume = read_volume(data, name=name)
        expected = offline.predict_volume(volume.hu, volume.notes).to_dict()
        for key in ("probabilities", "raw_probabilities"):
            np.testing.assert_allclose([served[key][c] for c in expected[key]], list(expected[key].values()),
                                       atol=1e-5, rtol=0)
        assert served["decisions"] == expected["decisions"] and served["key_slices"] == expected["key_slices"]
        assert served["slice_positions"] == expected["slice_positions"] and served["notes"] == expected["notes"]
        assert served["model_version"] == service["versions"]["a"]
        assert served["volume"]["shape"] == list(hu.shape) and served["volume"]["slices_used"] == 8
        assert 0 < len(served["findings"]) < 18  # the calibration's intercepts make some classes positive
        assert [f["class"] for f in served["findings"]] == sorted(
            expected["key_slices"], key=lambda c: -expected["probabilities"][c])
        wanted = {str(p) for f in served["findings"] for p in f["key_slices"]}
        assert set(served["thumbnails"]) == wanted
        assert all(v.startswith("data:image/png;base64,") for v in served["thumbnails"].values())
    # raw bytes with ?filename= work as well as multipart
    raw = service["client"].post("/v1/predict/volume", content=nifti_gz(hu), params={"filename": "x.nii.gz"},
                                 headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert raw.status_code == 200 and "thumbnails" not in raw.json()


def test_dicom_series_zip_is_served_as_its_nifti_and_bad_series_get_4xx(service, tmp_path):
    import zipfile

    from dicom_series import PATIENT, write_series

    def zipped(folder, extra=()):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, path.name)
            for name, data in extra:
                archive.writestr(name, data)
        return buffer.getvalue()

    client = service["client"]
    hu = chest(seed=4)
    paths = write_series(tmp_path / "s", hu, spacing=(2.0, 0.7, 0.7))
    served = post_volume(client, zipped(tmp_path / "s"), "series.zip")
    assert served.status_code == 200, served.text
    as_nifti = post_volume(client, nifti_gz(hu), "series.nii.gz").json()
    np.testing.assert_allclose(list(served.json()["probabilities"].values()),
                               list(as_nifti["probabilities"].values()), atol=1e-6, rtol=0)
    assert served.json()["volume"]["filename"] == "series.zip"
    write_series(tmp_path / "mr", hu[:6], modality="MR")
    paths[3].write_bytes(paths[3].read_bytes()[:-900])
    refusals = [(zipped(tmp_path / "mr"), 422, "modality MR"),
                (zipped(tmp_path / "s"), 422, f"series.zip/{paths[3].name}: unreadable pixel data"),
                (zipped(tmp_path / "mr", [("../x.dcm", b"x")]), 415, "points outside the archive")]
    for payload, status, reason in refusals:
        response = post_volume(client, payload, "series.zip")
        assert response.status_code == status and reason in response.json()["detail"], response.text
        assert not any(secret in response.text for secret in PATIENT.values())
    assert not any(secret in served.text for secret in PATIENT.values())
    assert_good_request_works(client)


def test_slice_probabilities_equal_offline_predictor(service, offline):
    hu = chest(seed=2)
    inputs = [hu[10], hu[20, 5:60, 3:50].astype(np.int16), np.pad(hu[30], 20, constant_values=-1000)]
    files = [("files", (f"s{i}.npy", npy(s))) for i, s in enumerate(inputs)] + [("files", ("stack.npy", npy(hu[5:8])))]
    response = service["client"].post("/v1/predict/slices", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    served = response.json()
    all_slices = [*inputs, *hu[5:8]]
    raw, calibrated = offline.predict_slices(all_slices)
    assert [s["name"] for s in served["slices"]] == ["s0.npy", "s1.npy", "s2.npy", "stack.npy[0]", "stack.npy[1]",
                                                     "stack.npy[2]"]
    got = np.array([list(s["probabilities"].values()) for s in served["slices"]])
    got_raw = np.array([list(s["raw_probabilities"].values()) for s in served["slices"]])
    np.testing.assert_allclose(got, calibrated, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_raw, raw, atol=1e-5, rtol=0)
    first = served["slices"][0]
    assert first["positive"] == [c for c, p in first["probabilities"].items() if p >= 0.5]
    assert served["model_version"] == service["versions"]["a"]


def make_mil_bundle(path, seed=2, image_size=64):
    import torch

    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.calibration import Calibration
    from ctplatform.model.mil import build_mil_model

    torch.manual_seed(seed)
    model = build_mil_model("resnet50", mil_pooling="per-class", mil_hidden=32)
    with torch.no_grad():  # spread the random attention so slices get clearly different weights
        model.pool.attention_w.weight.mul_(30.0)
    spec = ModelSpec(architecture={"head": "attention-mil", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=image_size, num_slices=8).to_dict(),
                     calibration=Calibration(np.full(18, 1.0), np.linspace(-2.0, 2.0, 18)),
                     source={"run_name": "test-mil"})
    return export_bundle(path, model.eval(), spec)


def test_attention_mil_bundle_serves_attention_weights(service):
    from ray import serve

    from ctplatform.data import read_volume
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.serve.app import build_app

    bundle = make_mil_bundle(service["root"] / "mil")
    serve.run(build_app(app_config(bundle)), name="mil", route_prefix="/mil")
    try:
        data = nifti_gz(chest(seed=4))
        response = service["client"].post("/mil/v1/predict/volume", files={"file": ("scan.nii.gz", data)},
                                          headers=AUTH)
        assert response.status_code == 200, response.text
        served = response.json()
        volume = read_volume(data, name="scan.nii.gz")
        expected = Predictor.from_path(bundle, device="cpu").predict_volume(volume.hu, volume.notes).to_dict()
        np.testing.assert_allclose([served["raw_probabilities"][c] for c in expected["raw_probabilities"]],
                                   list(expected["raw_probabilities"].values()), atol=1e-5, rtol=0)
        attention = served["slice_attention"]
        assert set(attention) == set(expected["probabilities"])
        for name, weights in attention.items():
            assert len(weights) == len(served["slice_positions"]) == 8
            assert sum(weights) == pytest.approx(1.0, abs=1e-4)
            np.testing.assert_allclose(weights, expected["slice_attention"][name], atol=1e-5)
        assert served["findings"], "the calibration makes some classes positive"
        for finding in served["findings"]:  # the key slices are the most attended ones, with their weights
            weights = attention[finding["class"]]
            assert finding["key_slice_attention"][0] == pytest.approx(max(weights), abs=1e-6)
        info = service["client"].get("/mil/v1/model", headers=AUTH).json()
        assert info["serving"]["mil_head"] is True and info["architecture"]["head"] == "attention-mil"
    finally:
        serve.delete("mil")


def test_concurrent_requests_are_batched(service):
    hu = chest(seed=4)

    async def burst(n):
        async with httpx.AsyncClient(base_url=service["url"], timeout=60) as client:
            posts = [client.post("/v1/predict/slices", files={"files": (f"{i}.npy", npy(hu[i % 40]))}, headers=AUTH)
                     for i in range(n)]
            return await asyncio.gather(*posts)

    for _attempt in range(3):
        responses = asyncio.run(burst(24))
        assert all(r.status_code in (200, 503) for r in responses)
        assert sum(r.status_code == 200 for r in responses) >= 4
        stats = service["client"].get("/v1/stats", headers=AUTH).json()["model"]
        if stats["max_requests_per_batch"] > 1:
            break
    assert stats["max_requests_per_batch"] > 1, stats
    assert stats["batching"] and sum(stats["requests_per_batch"].values()) == stats["batches"]


def not_npy_pickle():
    return npy(np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)


MALFORMED = {
    # name: (route, file name, payload, expected status)
    "pickled-npy": ("slices", "p.npy", not_npy_pickle, 422),
    "bool-npy": ("slices", "b.npy", lambda: npy(np.zeros((16, 16), bool)), 422),
    "truncated-gzip": ("volume", "t.nii.gz", lambda: nifti_gz(chest(seed=5))[:5000], 422),
    "gzip-bomb": ("volume", "bomb.nii.gz", lambda: gzip_bomb((512, 512, 256)), 413),
    "gzip-bomb-tail": ("volume", "tail.nii.gz", lambda: gzip_bomb((16, 16, 8)), 422),
    "terabyte-header": ("volume", "huge.nii.gz", terabyte_header, 413),
    "nan-spacing": ("volume", "nan.nii.gz", lambda: nifti_gz(chest(seed=6), zooms=(np.nan, 0.7, 2.0)), 422),
    "2d-volume": ("volume", "flat.nii",
                  lambda: nib.Nifti1Image(chest(seed=7)[5].astype(np.int16), np.eye(4)).to_bytes(), 422),
    "wrong-dtype": ("volume", "c.nii", lambda: nib.Nifti1Image(np.zeros((8, 8, 4), np.complex64), np.eye(4)).to_bytes(),
                    422),
    "empty-body": ("volume", None, lambda: b"", 400),
    "text-file": ("volume", "notes.txt", lambda: b"this is a text file, not a CT volume\n" * 20, 415),
    "text-as-npy": ("slices", "x.npy", lambda: b"just text\n" * 10, 415),
    "broken-multipart": ("volume", "multipart", lambda: b"--B\r\nContent-Disposition: form-data; name=\"file\"; "
                                                        b"filename=\"a.nii.gz\"\r\n\r\nabc", 400),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_gets_4xx_and_next_good_request_succeeds(service, case):
    route, name, make, status = MALFORMED[case]
    client = service["client"]
    payload = make()
    if name is None:
        response = client.post(f"/v1/predict/{route}", content=payload, headers=AUTH)
    elif name == "multipart":
        response = client.post(f"/v1/predict/{route}", content=payload,
                               headers={**AUTH, "Content-Type": "multipart/form-data; boundary=B"})
    else:
        field = "files" if route == "slices" else "file"
        response = client.post(f"/v1/predict/{route}", files={field: (name, payload)}, headers=AUTH)
    assert response.status_code == status, response.text
    assert response.json()["detail"]  # a reason, not just a code
    assert_good_request_works(client)


def test_body_size_cap(service):
    client = service["client"]
    big = os.urandom(9 * MiB)
    response = client.post("/v1/predict/volume", content=big, params={"filename": "big.nii"},
                           headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunked():  # no Content-Length: the cap applies while the body streams in
        for _ in range(9):
            yield bytes(MiB)

    response = client.post("/v1/predict/volume", content=chunked(), params={"filename": "big.nii"},
                           headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert response.status_code == 413
    assert_good_request_works(client)


def test_api_key_required_on_every_prediction_route(service):
    client = service["client"]
    data = nifti_gz(chest(seed=8))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        assert post_volume(client, data, headers=headers).status_code == 401
        response = client.post("/v1/predict/slices", files={"files": ("a.npy", npy(chest()[9]))}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/model", headers=headers).status_code == 401
        assert client.get("/v1/stats", headers=headers).status_code == 401
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    assert post_volume(client, data).status_code == 200


# ----------------------------------------------------------------------------------------------- the page
class DevTools:
    """A minimal Chrome DevTools Protocol client over the page target's websocket."""

    def __init__(self, url):
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=64 * MiB, open_timeout=20)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium): the page test needs it")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--no-proxy-server", "--disable-extensions", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "--window-size=1100,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as listing:
            page = next(t for t in json.load(listing) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_page_uploads_a_volume_and_renders_results_in_chromium(service, chromium, tmp_path):
    """Chromium loads the page, a real file is set on its <input type=file> (as a user's choice would), the button
    is clicked, and the page's script renders bars and key-slice thumbnails from the real API's answer."""
    data = nifti_gz(chest(seed=9))
    volume_file = tmp_path / "patient.nii.gz"
    volume_file.write_bytes(data)
    expected = post_volume(service["client"], data, "patient.nii.gz").json()

    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=f"{service['url']}/#key={KEY}")
    chromium.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    root = chromium.call("DOM.getDocument")["root"]["nodeId"]
    file_input = chromium.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    chromium.call("DOM.setFileInputFiles", files=[str(volume_file)], nodeId=file_input)
    chromium.evaluate("document.getElementById('go').click()")
    state = chromium.wait_for("['done', 'error'].includes(document.getElementById('status').dataset.state) && "
                              "document.getElementById('status').dataset.state")
    assert state == "done", chromium.evaluate("document.getElementById('status').textContent")

    rendered = chromium.evaluate("""JSON.stringify({
        rows: [...document.querySelectorAll('#bars .row')].map(r => ({
            name: r.dataset.class, p: Number(r.dataset.probability), positive: r.classList.contains('positive'),
            width: r.querySelector('.bar').style.width})),
        findings: [...document.querySelectorAll('#findings .finding')].map(f => f.dataset.class),
        thumbs: [...document.querySelectorAll('img.thumb')].map(i => ({
            position: i.dataset.position, loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth})),
        meta: document.getElementById('meta').textContent})""")
    page = json.loads(rendered)
    assert [r["name"] for r in page["rows"]] == list(expected["probabilities"])
    for row in page["rows"]:
        assert row["p"] == pytest.approx(expected["probabilities"][row["name"]], abs=1e-9)
        assert row["positive"] == expected["decisions"][row["name"]]
        assert row["width"].endswith("%")
        assert float(row["width"][:-1]) == pytest.approx(100 * expected["probabilities"][row["name"]], abs=0.051)
    assert page["findings"] == [f["class"] for f in expected["findings"]] and page["findings"]
    key_slices = [str(p) for f in expected["findings"] for p in f["key_slices"]]
    assert [t["position"] for t in page["thumbs"]] == key_slices
    assert all(t["loaded"] and t["width"] == 64 for t in page["thumbs"])  # the PNGs decoded in the browser
    assert "patient.nii.gz" in page["meta"] and expected["model_version"] in page["meta"]
    shot = chromium.call("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "page.png").write_bytes(__import__("base64").b64decode(shot))


def test_page_without_key_shows_the_401_reason(service, chromium, tmp_path):
    volume_file = tmp_path / "v.nii.gz"
    volume_file.write_bytes(nifti_gz(chest(seed=10)))
    chromium.call("Page.navigate", url=f"{service['url']}/")
    chromium.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    root = chromium.call("DOM.getDocument")["root"]["nodeId"]
    node = chromium.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    chromium.call("DOM.setFileInputFiles", files=[str(volume_file)], nodeId=node)
    chromium.evaluate("document.getElementById('go').click()")
    chromium.wait_for("document.getElementById('status').dataset.state === 'error'")
    assert "401" in chromium.evaluate("document.getElementById('status').textContent")


# ----------------------------------------------------------------------------------------------- overload, rollout
def test_overload_gets_a_fast_503_and_the_service_recovers(service):
    data = nifti_gz(chest(seed=11))

    async def flood(n):
        async with httpx.AsyncClient(base_url=service["url"], timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as client:
            async def one():
                started = time.perf_counter()
                response = await client.post("/v1/predict/volume", files={"file": ("f.nii.gz", data)}, headers=AUTH)
                return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(n)))

    results = asyncio.run(flood(40))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [(t, retry) for s, t, retry in results if s == 503]
    assert rejected, "40 concurrent volumes against 4 ongoing + 4 queued: some must be refused"
    assert statuses.count(200) >= 4
    assert max(t for t, _ in rejected) < 2.0, rejected  # refused at once, not after waiting in a queue
    assert_good_request_works(service["client"])


def test_rolling_update_under_load_loses_no_request(service):
    from ray import serve

    from ctplatform.serve.app import build_app

    old, new = service["versions"]["a"], service["versions"]["b"]
    volume, one_slice = nifti_gz(chest(seed=12)), npy(chest(seed=12)[15])
    log: list[tuple] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(base_url=service["url"], timeout=60) as client:
            i = 0
            while not stop.is_set():
                try:
                    if i % 2:
                        r = client.post("/v1/predict/slices", files={"files": ("s.npy", one_slice)}, headers=AUTH)
                    else:
                        r = post_volume(client, volume)
                    log.append((r.status_code, r.json().get("model_version"), r.text[:200]))
                except Exception as exc:  # a dropped connection counts as a lost request
                    log.append((None, None, repr(exc)))
                i += 1

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        serve.run(build_app(app_config(service["bundles"]["b"])), name=APP, route_prefix="/")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(v == new for _, v, _ in log[-4:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failures = [entry for entry in log if entry[0] != 200]
    assert not failures, failures[:5]
    versions = [v for _, v, _ in log]
    assert old in versions and new in versions and versions[-1] == new and len(log) >= 10
    assert service["client"].get("/readyz").json()["model_version"] == new
