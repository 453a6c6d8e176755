"""Every user path may be an object-store URI: the storage helper, the checks before a command starts, and
demo-data -> prepare against a real S3-protocol server (moto in server mode, `tests/s3_server.py`); the tests taking
`bucket` run on the GCS emulator too (`tests/gcs_server.py`; gs:// specifics: tests/test_object_storage_gcs.py)."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pandas as pd
import pytest
from storage_checks import SETTINGS, SETTINGS_FLAGS, cache_files, local_cache_files, one_error_line

from ctplatform import storage
from ctplatform.cli import main
from ctplatform.data.prepare import run_prepare

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["s3_bucket", "gcs_bucket"])
def bucket(request) -> str:
    """A fresh bucket on each protocol's test server (`s3://` on moto, `gs://` on the GCS emulator): the checks
    below hold for both."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("uri, problem", [("s3://ab/x", "invalid S3 bucket name"),
                                          ("s3://Upper_Case/x", "invalid S3 bucket name"),
                                          ("nosuchscheme://b/x", "unknown storage scheme")])
def test_a_uri_that_can_never_work_is_refused_while_parsing(uri, problem, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error: exit 2, the flag and the problem
        main(["prepare", "--data-dir", uri, "--out", "/tmp/never-written", "--no-ray"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and problem in line and uri in line and "--data-dir" in line


def test_a_local_path_is_left_as_given_and_a_uri_is_never_a_path():
    assert storage.user_path("runs/a") == "runs/a"
    assert storage.user_path("s3://bucket-1/runs/") == "s3://bucket-1/runs"
    assert storage.join("s3://bucket-1/runs", "a", "b.json") == "s3://bucket-1/runs/a/b.json"
    assert not storage.is_uri("s3:/bucket-1/x") and storage.is_uri("gs://b/x") and storage.is_uri("file:///tmp/x")


def test_missing_bucket_and_wrong_credentials_stop_before_ray(s3_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    assert main(["prepare", "--data-dir", "s3://no-such-bucket-here/data", "--out", f"{s3_bucket}/cache"]) == 2
    assert "bucket 'no-such-bucket-here' does not exist" in one_error_line(capsys)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["tune", "--slice-dir", f"{s3_bucket}/cache", "--storage-path", f"{s3_bucket}/runs"]) == 2
    line = one_error_line(capsys)
    assert "access denied" in line and s3_bucket in line
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_before  # Ray never started
    assert os.listdir(tmp_path) == []


def test_demo_data_and_prepare_from_and_to_a_bucket(s3_bucket, tiny_dataset, tiny_cache, tmp_path, monkeypatch,
                                                    capsys):
    """The bucket chain gives the same cache as the local one (tiny_cache, prepared from local files), writes
    nothing in the working directory, and a rerun skips what is done."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo-data", "--out", f"{s3_bucket}/small", "--volumes", "4", "--size", "32x32x16"]) == 0
    names = storage.list_files(f"{s3_bucket}/small")
    assert any(n.endswith(".nii.gz") for n in names) and "dataset/multi_abnormality_labels/train_predicted_labels.csv" \
        in names
    storage.upload(tiny_dataset, f"{s3_bucket}/data")
    cache = f"{s3_bucket}/cache"
    summary = run_prepare(f"{s3_bucket}/data", cache, SETTINGS, executor="local", progress=False)
    assert summary["prepared_now"] == 24 and summary["failures"] == f"{cache}/failures.csv"
    assert cache_files(cache) == local_cache_files(tiny_cache)
    index = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{cache}/index.parquet")))
    pd.testing.assert_frame_equal(index, pd.read_parquet(tiny_cache / "index.parquet"))
    assert main(["prepare", "--data-dir", f"{s3_bucket}/data", "--out", cache, "--no-ray", *SETTINGS_FLAGS]) == 0
    assert '"prepared_now": 0' in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_half_written_volume_is_prepared_again_and_failures_land_in_the_bucket(bucket, tiny_dataset, tiny_cache):
    """A prepare killed mid-upload leaves at most a volume object without its record (on a store that shows
    partial uploads, a truncated one): the rerun writes it again and the index never lists it before."""
    storage.upload(tiny_dataset, f"{bucket}/data")
    cache = f"{bucket}/cache"
    run_prepare(f"{bucket}/data", cache, SETTINGS, executor="local", progress=False)
    victim = sorted(tiny_cache.glob("volumes/train/*.npy"))[0]
    stem = victim.stem
    storage.remove(f"{cache}/records/{stem}.json")
    storage.write_bytes(f"{cache}/volumes/train/{victim.name}", victim.read_bytes()[:100])  # the killed upload
    from ctplatform.data.prepare import discover_tasks, finalize_cache

    partial = finalize_cache(cache, discover_tasks(f"{bucket}/data"))
    assert stem not in set(partial["stem"])  # not read as a complete volume
    # a corrupt source volume: its failure is listed in the bucket's failures.csv, the rest complete
    broken = next(n for n in storage.list_files(f"{bucket}/data")
                  if n.endswith(".nii.gz") and not n.endswith(f"/{stem}.nii.gz"))
    storage.write_bytes(f"{bucket}/data/{broken}", b"not a volume")
    summary = run_prepare(f"{bucket}/data", cache, SETTINGS, executor="local", progress=False)
    assert summary["prepared_now"] == 1 and summary["failed"] == 0  # only the half-written one was redone
    assert storage.read_bytes(f"{cache}/volumes/train/{victim.name}") == victim.read_bytes()
    storage.remove(f"{cache}/records")
    summary = run_prepare(f"{bucket}/data", cache, SETTINGS, executor="local", progress=False)
    failures = pd.read_csv(io.BytesIO(storage.read_bytes(f"{cache}/failures.csv")))
    assert summary["failed"] == 1 and failures["path"].tolist() == [f"{bucket}/data/{broken}"]
    assert summary["cached"] == 23
    np.testing.assert_array_equal(
        np.load(io.BytesIO(storage.read_bytes(f"{cache}/volumes/train/{victim.name}"))), np.load(victim))


def test_node_local_copy_is_whole_shared_and_bounded(bucket, tmp_path):
    """Files arrive whole under their name (no partial file left), two readers share one copy, and past its limit
    the least recently used files go (a file still wanted is fetched again, with the same bytes)."""
    from ctplatform.data.local_cache import NodeLocalCache

    blobs = {f"volumes/train/v{i}.npy": bytes([i]) * 300_000 for i in range(4)}
    for name, data in blobs.items():
        storage.write_bytes(f"{bucket}/cache/{name}", data)
    limit_gb = 700_000 / (1 << 30)  # room for two of the four files
    first, second = (NodeLocalCache(f"{bucket}/cache", limit_gb, home=tmp_path) for _ in range(2))
    assert first.root == second.root
    for name in blobs:
        assert first.path(name).read_bytes() == blobs[name]
        os.utime(first.root / name, (0, 1_000_000 + int(name[-5])))  # fixed, increasing last-use times
    first.evict()
    left = sorted(p.relative_to(first.root).as_posix() for p in first.root.rglob("*.npy"))
    assert left == ["volumes/train/v2.npy", "volumes/train/v3.npy"] and first.size_bytes() <= first.limit_bytes
    assert not list(first.root.rglob("*.part"))
    assert second.path("volumes/train/v0.npy").read_bytes() == blobs["volumes/train/v0.npy"]  # fetched again


def test_bundle_in_a_bucket_is_checked_and_copied_once_per_version(bucket, tmp_path, monkeypatch, capsys):
    import torch

    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.calibration import Calibration
    from ctplatform.model.classifier import build_classifier
    from ctplatform.serve.bundles import chosen_bundle

    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "home"))
    torch.manual_seed(0)
    model = build_classifier("efficientnet_b0")
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=SETTINGS.to_dict(), aggregation="topk", topk=2,
                     calibration=Calibration(np.full(18, 1.2), np.zeros(18), "test"))
    bundle = export_bundle(tmp_path / "local" / "b1", model.eval(), spec)
    storage.upload(bundle, f"{bucket}/models/b1")
    assert main(["bundle", "check", f"{bucket}/models/b1"]) == 0
    assert "ok" in capsys.readouterr().out.lower()
    copy = chosen_bundle(f"{bucket}/models/b1")
    assert copy.is_relative_to(tmp_path / "home") and chosen_bundle(f"{bucket}/models/b1") == copy
    assert (copy / "model.safetensors").read_bytes() == (bundle / "model.safetensors").read_bytes()
    storage.write_bytes(f"{bucket}/models/b1/metadata.json", b"{}")  # a new version at the same URI
    assert chosen_bundle(f"{bucket}/models/b1") != copy
    assert main(["bundle", "check", f"{bucket}/models/b1"]) == 2
    assert "metadata.json" in one_error_line(capsys)


def test_bad_input_staged_from_a_bucket_is_named_by_its_uri(bucket, capsys):
    """A bad file given as a URI is reported under that URI, not the temporary copy the command read."""
    storage.write_bytes(f"{bucket}/in/labels.csv", b"VolumeName,nothing else\nx.nii.gz,1\n")
    storage.write_bytes(f"{bucket}/in/preds.csv", b"VolumeName\nx.nii.gz\n")
    assert main(["score", "--labels", f"{bucket}/in/labels.csv", "--predictions", f"{bucket}/in/preds.csv"]) == 2
    line = one_error_line(capsys)
    assert f"{bucket}/in/" in line and "ctplatform-stage" not in line, line
