"""`prepare`: the slice cache from real synthetic NIfTI files; resumable, crash-safe, Ray-parallel."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctplatform.data.datasets import SliceDataset, VolumeDataset, load_cache_index
from ctplatform.data.errors import DataFormatError
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings, select_slices
from ctplatform.labels import CLASS_NAMES

SETTINGS = PreprocessSettings(image_size=32, num_slices=8)


def cache_digest(root: Path) -> dict[str, str]:
    """Hash of every file that makes up the cache (volumes, index, failures), by relative path."""
    files = sorted([*root.glob("volumes/*/*.npy"), root / "index.parquet", root / "failures.csv", root / "cache.json"])
    digests = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    index = pd.read_parquet(root / "index.parquet")  # parquet bytes may embed writer metadata: compare content too
    digests["index-content"] = hashlib.sha256(index.to_csv(index=False).encode()).hexdigest()
    digests.pop("index.parquet")
    return digests


def test_cache_layout_dtype_and_labels(tiny_dataset, tiny_cache):
    index = pd.read_parquet(tiny_cache / "index.parquet")
    assert len(index) == 24 and set(index["split"]) == {"train", "valid"}
    labels = pd.concat(
        pd.read_csv(p) for p in (tiny_dataset / "dataset" / "multi_abnormality_labels").glob("*.csv")
    ).set_index("VolumeName")
    for row in index.itertuples(index=False):
        array = np.load(tiny_cache / row.file, mmap_mode="r")
        assert array.dtype == np.int16 and array.shape == (8, 32, 32) and array.flags.c_contiguous
        assert array.min() >= -1024 and array.max() <= 3071
        assert list(row.slice_positions) == sorted(row.slice_positions)
    merged = index.set_index("VolumeName")[list(CLASS_NAMES)]
    assert (merged.to_numpy() == labels.loc[merged.index, list(CLASS_NAMES)].to_numpy()).all()
    # the _fixed volumes were not shifted by a second rescale: air reads about -1000 HU in every volume
    for row in index.itertuples(index=False):
        corner = np.load(tiny_cache / row.file)[:, :2, :2]
        assert corner.mean() < -900, row.VolumeName
    assert set(index["hu_source"]) == {"metadata", "header"}


def test_patients_never_straddle_splits(tiny_cache):
    index = pd.read_parquet(tiny_cache / "index.parquet")
    assert index.groupby("patient")["split"].nunique().max() == 1


def test_slice_selection_stays_in_body():
    hu = np.full((40, 16, 16), -1000, np.float32)
    hu[10:30, 4:12, 4:12] = 40
    positions = select_slices(hu, PreprocessSettings(num_slices=5))
    assert positions.min() >= 10 and positions.max() <= 29 and len(positions) == 5
    strided = select_slices(hu, PreprocessSettings(selection="stride", stride=4))
    assert strided.tolist() == list(range(10, 30, 4))


def test_datasets_read_the_cache(tiny_cache):
    index = load_cache_index(tiny_cache)
    slices = SliceDataset(index, "train")
    image, labels, volume, item = slices[3]
    assert image.dtype.is_floating_point is False and tuple(image.shape) == (32, 32) and item == 3
    assert labels.shape == (18,)
    volumes = VolumeDataset(index, "valid")
    stack, _, _ = volumes[0]
    assert tuple(stack.shape) == (8, 32, 32)
    assert len(slices) == 8 * len(index.split_volumes("train"))


def test_rerun_skips_finished_and_other_settings_refused(tiny_dataset, tiny_cache, tmp_path):
    cache = Path(shutil.copytree(tiny_cache, tmp_path / "cache"))
    before = cache_digest(cache)
    summary = run_prepare(tiny_dataset, cache, SETTINGS, executor="local", progress=False)
    assert summary["prepared_now"] == 0 and cache_digest(cache) == before
    with pytest.raises(DataFormatError, match="other settings"):
        run_prepare(tiny_dataset, cache, PreprocessSettings(image_size=48), executor="local", progress=False)


def test_corrupt_volume_lands_in_failures_and_others_complete(tiny_dataset, tmp_path):
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    victim = sorted((data / "dataset").rglob("*.nii.gz"))[3]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated gzip
    summary = run_prepare(data, tmp_path / "cache", SETTINGS, executor="local", progress=False)
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv")
    assert summary["failed"] == 1 and summary["cached"] == 23
    assert failures.loc[0, "VolumeName"].startswith(victim.name.split(".")[0])
    assert "truncated" in failures.loc[0, "reason"] or "corrupt" in failures.loc[0, "reason"]


def test_legacy_layout_round_trip(tiny_dataset, tmp_path):
    out = tmp_path / "cache"
    run_prepare(tiny_dataset, out, SETTINGS, executor="local", progress=False, legacy_layout=True)
    csv = pd.read_csv(out / "splits" / "train_slices.csv")
    assert list(csv.columns[:3]) == ["slice_path", "VolumeName", "slice_index"]
    one = np.load(out / csv.loc[0, "slice_path"], allow_pickle=False)
    assert one.shape == (32, 32) and one.dtype == np.int16
    (out / "index.parquet").unlink()  # read it as the old scripts' layout only
    legacy = load_cache_index(out)
    cache_train = 8 * (pd.read_csv(out / "splits" / "train_slices.csv")["VolumeName"].nunique())
    assert legacy.layout == "legacy" and len(SliceDataset(legacy, "train")) == cache_train


PREPARE_SCRIPT = """
import sys, time
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
slow = lambda result: time.sleep(0.4)  # make the run long enough to be killed mid-way
run_prepare(sys.argv[1], sys.argv[2], PreprocessSettings(image_size=32, num_slices=8), executor=sys.argv[3],
            progress=False, on_result=slow if sys.argv[4] == "slow" else None)
"""


def run_script(data, out, executor, pace):
    return subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, str(data), str(out), executor, pace],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_and_rerun_equals_uninterrupted(tiny_dataset, tiny_cache, tmp_path):
    out = tmp_path / "cache"
    process = run_script(tiny_dataset, out, "local", "slow")
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "records").glob("*.json"))) < 5:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((out / "records").glob("*.json")))
    assert 5 <= done < 24 and not (out / "index.parquet").exists()
    summary = run_prepare(tiny_dataset, out, SETTINGS, executor="local", progress=False)
    assert summary["prepared_now"] == 24 - done
    assert cache_digest(out) == cache_digest(tiny_cache)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_parallel_prepare_equals_single_process(tiny_dataset, tiny_cache, tmp_path):
    out = tmp_path / "cache"
    summary = run_prepare(tiny_dataset, out, SETTINGS, executor="ray", workers=2, progress=False)
    assert summary["cached"] == 24
    assert cache_digest(out) == cache_digest(tiny_cache)
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert all(r["status"] == "ok" for r in records)


def test_prepare_path_equals_the_predict_path(tiny_dataset):
    """prepare converts only the kept slices to HU; predict/serve convert whole volumes: same slices either way."""
    from ctplatform.data import read_raw_volume, read_volume
    from ctplatform.data.preprocess import preprocess_raw_volume, preprocess_volume

    for path in sorted((tiny_dataset / "dataset").rglob("*.nii.gz"))[:6]:
        settings = PreprocessSettings(image_size=24, num_slices=5)
        lazy, lazy_positions = preprocess_raw_volume(read_raw_volume(path), settings)
        full, full_positions = preprocess_volume(read_volume(path).hu, settings)
        np.testing.assert_array_equal(lazy_positions, full_positions)
        np.testing.assert_array_equal(lazy, full)


def test_ray_batches_keep_every_cpu_busy():
    from ctplatform.data.prepare_ray import MAX_BATCH, batch_size

    assert batch_size(24, 2) == 3  # a quarter of each CPU's share
    assert batch_size(5, 2) == 1  # the last volumes go one by one
    assert batch_size(50_188, 64) == MAX_BATCH
    sizes, remaining = [], 192
    while remaining:  # the sizes a 192-volume job on 2 CPUs is handed out in: large first, single at the end
        sizes.append(batch_size(remaining, 2))
        remaining -= sizes[-1]
    assert sizes[0] == MAX_BATCH and sizes[-8:] == [1] * 8 and sizes == sorted(sizes, reverse=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_prepare_spreads_over_the_nodes_of_a_cluster(tiny_dataset, tiny_cache, tmp_path):
    """Two raylets on one machine (one CPU each): both nodes run prepare's tasks, and the cache is the
    single-process one."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        out = tmp_path / "cache"
        summary = run_prepare(tiny_dataset, out, SETTINGS, executor="ray", address=cluster.address, progress=False)
        assert summary["cached"] == 24
        assert cache_digest(out) == cache_digest(tiny_cache)
        nodes: set[str] = set()
        deadline = time.monotonic() + 30
        while len(nodes) < 2 and time.monotonic() < deadline:  # task events reach the state API within seconds
            tasks = list_tasks(filters=[("name", "=", "prepare_batch"), ("state", "=", "FINISHED")], limit=1000)
            nodes = {t.node_id for t in tasks}
            time.sleep(0.5)
        assert nodes == {cluster.head_node.node_id, worker.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
