"""Every user path may be an object-store URI: the storage helper, the checks before a command starts, and
demo-data -> prepare against a real S3-protocol server (moto in server mode, `tests/s3_server.py`)."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pandas as pd
import pytest

from ctplatform import storage
from ctplatform.cli import main
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings

pytestmark = pytest.mark.timeout(120)
SETTINGS = PreprocessSettings(image_size=32, num_slices=8)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


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
    assert "bucket 'no-such-bucket-here' does not exist" in _one_error_line(capsys)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["tune", "--slice-dir", f"{s3_bucket}/cache", "--storage-path", f"{s3_bucket}/runs"]) == 2
    line = _one_error_line(capsys)
    assert "access denied" in line and s3_bucket in line
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_before  # Ray never started
    assert os.listdir(tmp_path) == []


def _cache_files(location: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(location, name)) for name in storage.list_files(location)
            if name.startswith("volumes/")}


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
    expected = {f"volumes/{p.parent.name}/{p.name}": p.read_bytes() for p in tiny_cache.glob("volumes/*/*.npy")}
    assert _cache_files(cache) == expected
    index = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{cache}/index.parquet")))
    pd.testing.assert_frame_equal(index, pd.read_parquet(tiny_cache / "index.parquet"))
    assert main(["prepare", "--data-dir", f"{s3_bucket}/data", "--out", cache, "--no-ray", "--image-size", "32",
                 "--num-slices", "8"]) == 0
    assert '"prepared_now": 0' in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_half_written_volume_is_prepared_again_and_failures_land_in_the_bucket(s3_bucket, tiny_dataset, tiny_cache):
    """A prepare killed mid-upload leaves at most a volume object without its record (on a store that shows
    partial uploads, a truncated one): the rerun writes it again and the index never lists it before."""
    storage.upload(tiny_dataset, f"{s3_bucket}/data")
    cache = f"{s3_bucket}/cache"
    run_prepare(f"{s3_bucket}/data", cache, SETTINGS, executor="local", progress=False)
    victim = sorted(tiny_cache.glob("volumes/train/*.npy"))[0]
    stem = victim.stem
    storage.remove(f"{cache}/records/{stem}.json")
    storage.write_bytes(f"{cache}/volumes/train/{victim.name}", victim.read_bytes()[:100])  # the killed upload
    from ctplatform.data.prepare import discover_tasks, finalize_cache

    partial = finalize_cache(cache, discover_tasks(f"{s3_bucket}/data"))
    assert stem not in set(partial["stem"])  # not read as a complete volume
    # a corrupt source volume: its failure is listed in the bucket's failures.csv, the rest complete
    broken = next(n for n in storage.list_files(f"{s3_bucket}/data")
                  if n.endswith(".nii.gz") and not n.endswith(f"/{stem}.nii.gz"))
    storage.write_bytes(f"{s3_bucket}/data/{broken}", b"not a volume")
    summary = run_prepare(f"{s3_bucket}/data", cache, SETTINGS, executor="local", progress=False)
    assert summary["prepared_now"] == 1 and summary["failed"] == 0  # only the half-written one was redone
    assert storage.read_bytes(f"{cache}/volumes/train/{victim.name}") == victim.read_bytes()
    storage.remove(f"{cache}/records")
    summary = run_prepare(f"{s3_bucket}/data", cache, SETTINGS, executor="local", progress=False)
    failures = pd.read_csv(io.BytesIO(storage.read_bytes(f"{cache}/failures.csv")))
    assert summary["failed"] == 1 and failures["path"].tolist() == [f"{s3_bucket}/data/{broken}"]
    assert summary["cached"] == 23
    np.testing.assert_array_equal(
        np.load(io.BytesIO(storage.read_bytes(f"{cache}/volumes/train/{victim.name}"))), np.load(victim))
