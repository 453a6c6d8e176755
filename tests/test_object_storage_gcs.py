"""gs:// paths against a real GCS-protocol server (gcp-storage-emulator, `tests/gcs_server.py`): the checks before a
command starts, demo-data -> prepare bucket to bucket (no Ray), the node-local copy of a folder, and a bundle read
from a bucket. Ray Tune/Train storage on gs:// (pyarrow's GCS client) is not covered here (docs/operations.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gcs_server import gcs_env
from storage_checks import SETTINGS_FLAGS, cache_files, local_cache_files, one_error_line

from ctplatform import storage
from ctplatform.cli import main

# Each test takes seconds: gcsfs's gRPC bucket-type lookup (60 s per bucket against an emulator) would fail it.
pytestmark = pytest.mark.timeout(50)
DEMO = ["--volumes", "4", "--size", "32x32x16", "--seed", "3"]


def _bucket_name(uri: str) -> str:
    return uri.removeprefix("gs://")


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bucket_files(uri: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(uri, name)) for name in storage.list_files(uri)}


@pytest.mark.parametrize("uri", ["gs://ab/x", "gs://Upper/x", "gs://-dash-first/x", f"gs://{'a' * 64}/x"])
def test_a_gcs_bucket_name_that_can_never_exist_is_refused_while_parsing(uri, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["prepare", "--data-dir", uri, "--out", "/tmp/never-written", "--no-ray"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "invalid GCS bucket name" in line and uri in line and "--data-dir" in line


def test_gcs_bucket_names_google_allows_are_accepted():
    for uri in ("gs://my_bucket-1/x", f"gs://{'a' * 63}/x", f"gs://{'a' * 63}.{'b' * 63}/x", "gs://a.b/x/"):
        assert storage.user_path(uri) == uri.rstrip("/")


def test_missing_gcs_bucket_stops_the_command_before_anything_is_written(gcs_bucket, gcs_server, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # in a process of its own, as a user runs it (the emulator found through the environment alone)
    done = subprocess.run([sys.executable, "-m", "ctplatform.cli", "demo-data", "--out",
                           "gs://no-such-bucket-here/data", *DEMO], capture_output=True, text=True,
                          env=gcs_env(gcs_server), cwd=tmp_path, timeout=40)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "gs://no-such-bucket-here/data: bucket 'no-such-bucket-here' does not exist" in done.stderr
    # the input's bucket is missing: nothing may land in the output bucket that exists
    assert main(["prepare", "--data-dir", "gs://no-such-bucket-here/data", "--out", f"{gcs_bucket}/cache",
                 "--no-ray"]) == 2
    line = one_error_line(capsys)
    assert "gs://no-such-bucket-here/data: bucket 'no-such-bucket-here' does not exist" in line
    assert gcs_server.object_names(_bucket_name(gcs_bucket)) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [None, b"not json", b'{"type": "service_account", "client_email": "a@b"}'],
                         ids=["missing", "not-json", "incomplete"])
def test_unusable_google_credentials_file_stops_the_command_with_one_line(content, gcs_bucket, gcs_server, tmp_path,
                                                                          monkeypatch, capsys):
    """gcsfs alone would go on without credentials (unsigned requests) and the emulator would accept them."""
    credentials = tmp_path / "key.json"
    if content is not None:
        credentials.write_bytes(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    monkeypatch.chdir(tmp_path)
    assert main(["demo-data", "--out", f"{gcs_bucket}/data", *DEMO]) == 2
    line = one_error_line(capsys)
    assert f"{gcs_bucket}/data: GOOGLE_APPLICATION_CREDENTIALS={credentials} is not a usable credentials file" in line
    assert gcs_server.object_names(_bucket_name(gcs_bucket)) == []
    assert sorted(os.listdir(tmp_path)) == ([] if content is None else ["key.json"])


def test_gs_without_gcsfs_installed_names_the_extra(monkeypatch, tmp_path, capsys):
    """gcsfs is optional (`ctplatform[gcs]`): without it a gs:// path stops the command with the install line."""
    for module in ("gcsfs", "gcsfs.core"):
        monkeypatch.setitem(sys.modules, module, None)  # what an interpreter without gcsfs finds: no such module
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--data-dir", "gs://some-bucket/data", "--out", str(tmp_path / "cache"), "--no-ray"]) == 2
    line = one_error_line(capsys)
    assert "gs://some-bucket/data" in line and "pip install 'ctplatform[gcs]'" in line
    assert os.listdir(tmp_path) == []


@pytest.fixture
def refusing_gcs_endpoint(request):
    """An HTTP server on 127.0.0.1 that answers every request as GCS's JSON API answers refused credentials
    (status and message from the test's parameter): the emulator itself checks no credentials."""
    status, message = request.param

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"code": status, "message": message}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("refusing_gcs_endpoint", [
    (401, "Anonymous caller does not have storage.objects.list access to the Google Cloud Storage bucket."),
    (403, "tests@example.iam.gserviceaccount.com does not have storage.objects.list access to the bucket."),
], indirect=True, ids=["401-no-credentials", "403-no-permission"])
def test_refused_gcs_credentials_stop_the_command_with_one_line(refusing_gcs_endpoint, tmp_path):
    """Run as a subprocess, so gcsfs's own logging (a traceback per refused request) reaches stderr as it would."""
    env = {**os.environ, "STORAGE_EMULATOR_HOST": refusing_gcs_endpoint}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    done = subprocess.run([sys.executable, "-m", "ctplatform.cli", "prepare", "--data-dir", "gs://private-bucket/data",
                           "--out", str(tmp_path / "cache"), "--no-ray"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=40)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "gs://private-bucket/data: access denied" in lines[0] and "GOOGLE_APPLICATION_CREDENTIALS" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(20)  # ~2 s: a client that probed Google's metadata server or gRPC API first took 36 s here
def test_demo_data_and_prepare_gs_to_gs_give_the_bytes_of_the_local_run(gcs_bucket, gcs_server, tmp_path,
                                                                         monkeypatch, capsys):
    """The same commands with every path in the bucket and with every path local write the same files; a rerun
    skips the finished volumes; nothing lands in the working directory."""
    cwd, local = tmp_path / "cwd", tmp_path / "local"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data, cache = f"{gcs_bucket}/data", f"{gcs_bucket}/cache"
    assert main(["demo-data", "--out", data, *DEMO]) == 0
    assert main(["demo-data", "--out", str(local / "data"), *DEMO]) == 0
    local_data = _local_files(local / "data")
    assert any(n.endswith(".nii.gz") for n in local_data) and _bucket_files(data) == local_data
    # the objects are really on the server, under the names the local run used (read through its own JSON API)
    assert gcs_server.object_names(_bucket_name(gcs_bucket)) == sorted(f"data/{n}" for n in local_data)

    capsys.readouterr()
    assert main(["prepare", "--data-dir", data, "--out", cache, "--no-ray", *SETTINGS_FLAGS]) == 0
    assert '"prepared_now": 4' in capsys.readouterr().out
    assert main(["prepare", "--data-dir", str(local / "data"), "--out", str(local / "cache"), "--no-ray",
                 *SETTINGS_FLAGS]) == 0
    capsys.readouterr()
    assert cache_files(cache) == local_cache_files(local / "cache") != {}
    index = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{cache}/index.parquet")))
    pd.testing.assert_frame_equal(index, pd.read_parquet(local / "cache" / "index.parquet"))
    assert storage.read_bytes(f"{cache}/failures.csv") == (local / "cache" / "failures.csv").read_bytes()

    assert main(["prepare", "--data-dir", data, "--out", cache, "--no-ray", *SETTINGS_FLAGS]) == 0
    assert '"prepared_now": 0' in capsys.readouterr().out
    records = storage.list_files(f"{cache}/records")
    storage.remove(f"{cache}/records/{records[0]}")  # one volume unfinished: only it is prepared again
    assert main(["prepare", "--data-dir", data, "--out", cache, "--no-ray", *SETTINGS_FLAGS]) == 0
    assert '"prepared_now": 1' in capsys.readouterr().out
    assert cache_files(cache) == local_cache_files(local / "cache")
    assert os.listdir(cwd) == []


def test_node_local_copy_of_a_gs_folder_is_whole_shared_and_renewed(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "home"))
    blobs = {"a.bin": os.urandom(70_000), "sub/b.bin": b"b" * 10, "sub/deeper/c.json": b"{}"}
    for name, data in blobs.items():
        storage.write_bytes(f"{gcs_bucket}/folder/{name}", data)
    storage.write_bytes(f"{gcs_bucket}/folder-other/x", b"not below the folder")
    copy = storage.local_copy(f"{gcs_bucket}/folder")
    assert copy.name == "folder" and copy.is_relative_to(tmp_path / "home")
    assert _local_files(copy) == blobs
    assert not [p for p in (tmp_path / "home").rglob("*") if ".partial-" in p.name or p.name.endswith(".part")]
    assert storage.local_copy(f"{gcs_bucket}/folder") == copy  # a second reader shares the copy
    storage.write_bytes(f"{gcs_bucket}/folder/sub/b.bin", b"B" * 10)  # same size, new content
    renewed = storage.local_copy(f"{gcs_bucket}/folder")
    assert renewed != copy and (renewed / "sub" / "b.bin").read_bytes() == b"B" * 10
    single = storage.local_copy(f"{gcs_bucket}/folder/a.bin")
    assert single.name == "a.bin" and single.read_bytes() == blobs["a.bin"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        storage.local_copy(f"{gcs_bucket}/nothing-here")


def test_bundle_read_from_gs_predicts_as_the_local_bundle(gcs_bucket, tmp_path, monkeypatch, capsys):
    """`serve`'s bundle choice and `predict` with the bundle, the input and the output in the bucket: the same
    probabilities as the offline Predictor on the local bundle; nothing written to the working directory."""
    from serve_payloads import chest, make_bundle, npy

    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.serve.bundles import chosen_bundle

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "home"))
    bundle = make_bundle(tmp_path / "local" / "b1")
    storage.upload(bundle, f"{gcs_bucket}/models/b1")
    assert main(["bundle", "check", f"{gcs_bucket}/models/b1"]) == 0
    copy = chosen_bundle(f"{gcs_bucket}/models/b1")
    assert copy.is_relative_to(tmp_path / "home") and _local_files(copy) == _local_files(bundle)

    volume = chest(seed=1)
    expected = Predictor.from_path(bundle, device="cpu").predict_volume(volume).probabilities
    got = Predictor.from_path(copy, device="cpu").predict_volume(volume).probabilities
    np.testing.assert_array_equal(got, expected)

    slices = chest(shape=(40, 64, 64), seed=2)[[10, 20]]
    for i, hu in enumerate(slices):
        storage.write_bytes(f"{gcs_bucket}/inputs/s{i}.npy", npy(hu))
    assert main(["predict", "--checkpoint", f"{gcs_bucket}/models/b1", "--predict-type", "slices",
                 "--predict-input", f"{gcs_bucket}/inputs/s0.npy", f"{gcs_bucket}/inputs/s1.npy",
                 "--output", f"{gcs_bucket}/preds/p.csv"]) == 0
    table = pd.read_csv(io.BytesIO(storage.read_bytes(f"{gcs_bucket}/preds/p.csv")))
    _, calibrated = Predictor.from_path(bundle, device="cpu").predict_slices(list(slices))
    from ctplatform.labels import CLASS_NAMES

    np.testing.assert_allclose(table[list(CLASS_NAMES)].to_numpy(), calibrated, rtol=1e-5, atol=1e-6)
    assert table["VolumeName"].tolist() == ["s0", "s1"] and storage.is_file(f"{gcs_bucket}/preds/p.json")
    assert os.listdir(cwd) == []
