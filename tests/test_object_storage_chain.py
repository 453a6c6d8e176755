"""The whole command-line chain with every path in a bucket on the S3-protocol test server, from an empty working
directory: demo-data -> prepare (on Ray) -> run (train + evaluate) -> predict -> serve -> one HTTP request.

Several minutes on 2 cores (four Ray starts): marked `benchmark`, so `make test` leaves it out; run it with
`pytest -m benchmark tests/test_object_storage_chain.py`. The default suite covers each link on its own
(tests/test_object_storage.py; the sweep on a bucket in tests/test_tune.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from local_server import free_port

from ctplatform import storage

pytestmark = [pytest.mark.benchmark, pytest.mark.ray, pytest.mark.timeout(1500)]
EXE = Path(sys.executable).with_name("ctplatform")


def _cli(*args, env, cwd, timeout=600):
    out = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_chain_with_every_path_in_a_bucket(s3_bucket, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "CTPLATFORM_CACHE_DIR": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}
    data, cache, runs = f"{s3_bucket}/data", f"{s3_bucket}/cache", f"{s3_bucket}/runs"
    _cli("demo-data", "--out", data, "--volumes", "12", "--size", "32x32x16", env=env, cwd=cwd)
    _cli("prepare", "--data-dir", data, "--out", cache, "--image-size", "32", "--num-slices", "8", "--workers", "2",
         env=env, cwd=cwd)
    index = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{cache}/index.parquet")))
    assert len(index) == 12
    printed = _cli("run", "--slice-dir", cache, "--storage-path", runs, "--run-name", "r1", "--model", "resnet50",
                   "--epochs", "1", "--batch-size", "16", "--limit-train-batches", "2", "--num-workers", "0",
                   "--cpu", "--bootstrap-resamples", "50", env=env, cwd=cwd)
    assert f"uploaded to {runs}/r1" in printed
    files = storage.list_files(f"{runs}/r1")
    for name in ("config.yaml", "report/report.html", "report/results.json", "bundle/metadata.json",
                 "best_reported/checkpoint.ckpt"):
        assert name in files, name
    assert [f for f in files if f.startswith("checkpoint_") and f.endswith("/checkpoint.ckpt")]  # Ray's own
    volume = index[index["split"] == "valid"]["file"].iloc[0]
    one_slice = io.BytesIO()
    np.save(one_slice, np.load(io.BytesIO(storage.read_bytes(f"{cache}/{volume}")))[4])
    storage.write_bytes(f"{s3_bucket}/inputs/slice.npy", one_slice.getvalue())
    _cli("predict", "--checkpoint", f"{runs}/r1/bundle", "--predict-type", "slices", "--predict-input",
         f"{s3_bucket}/inputs/slice.npy", "--output", f"{s3_bucket}/preds/p.csv", env=env, cwd=cwd)
    predicted = pd.read_csv(io.BytesIO(storage.read_bytes(f"{s3_bucket}/preds/p.csv")))
    assert len(predicted) == 1 and storage.is_file(f"{s3_bucket}/preds/p.json")

    port = free_port()
    server = subprocess.Popen([str(EXE), "serve", "--bundle", f"{runs}/r1/bundle", "--port", str(port)], env=env,
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "service not ready"
            time.sleep(1)
        body = io.BytesIO(one_slice.getvalue())
        boundary = "ctplatformtestboundary"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"s.npy\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n").encode() + body.getvalue() + \
            f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict/slices", data=payload, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.load(answer)["slices"][0]["probabilities"]
        served = [result[name] for name in predicted.columns if name in result]
        expected = [predicted[name].iloc[0] for name in predicted.columns if name in result]
        assert len(served) == 18 and np.allclose(served, expected, atol=1e-4)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    assert os.listdir(cwd) == []
