"""`prepare`'s per-volume work: the writes overlapped with the next decode, and the HU conversions it shares."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctplatform.data import read_raw_volume
from ctplatform.data.hounsfield import HU_MAX, HU_MIN, rescaled_to_hu
from ctplatform.data.prepare import discover_tasks, open_cache, prepare_volume, prepare_volumes
from ctplatform.data.preprocess import PreprocessSettings

SETTINGS = PreprocessSettings(image_size=32, num_slices=8)


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overlapped_writes_equal_one_volume_at_a_time(tiny_dataset, tmp_path):
    tasks = discover_tasks(tiny_dataset)[:10]
    one_by_one = open_cache(tmp_path / "one", SETTINGS)
    want = [prepare_volume(task, one_by_one, SETTINGS, False) for task in tasks]
    overlapped = open_cache(tmp_path / "overlapped", SETTINGS)
    got = []
    for result in prepare_volumes(tasks, overlapped, SETTINGS, False):
        # yielded only once written: the record (written last) is already there, whole
        assert (Path(overlapped) / "records" / f"{result['stem']}.json").is_file()
        got.append(result)
    assert got == want and len(got) == 10
    assert cache_files(Path(overlapped)) == cache_files(Path(one_by_one))
    assert not list(Path(overlapped).rglob("*.tmp"))


def test_a_failed_write_is_raised_not_lost(tiny_dataset, tmp_path):
    tasks = [t for t in discover_tasks(tiny_dataset) if t.split == "train"][:3]
    out = open_cache(tmp_path / "cache", SETTINGS)
    (Path(out) / "volumes").mkdir()
    (Path(out) / "volumes" / "train").write_text("a file where the split's folder should be")
    with pytest.raises(OSError):
        list(prepare_volumes(tasks, out, SETTINGS, False))
    assert not (Path(out) / "records").exists()  # no record without its volume file


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int32, np.float32, np.float64])
@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (1.0, -1024.0), (0.5, -1024.0), (1.37, 12.3)])
def test_hu_equals_float32_arithmetic_on_the_stored_values(dtype, slope, intercept):
    stored = np.random.default_rng(3).normal(500, 1500, size=(19, 12, 10))
    if np.dtype(dtype).kind in "iu":
        stored = np.clip(stored, np.iinfo(dtype).min, np.iinfo(dtype).max)
    stored = stored.astype(dtype)[:, ::-1]  # a flipped view, as a canonically oriented volume is
    want = np.clip(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept), HU_MIN, HU_MAX)
    got = rescaled_to_hu(stored, slope, intercept)
    assert got.dtype == np.float32 and got.tobytes() == want.astype(np.float32).tobytes()


def test_hu_sample_is_converted_once_and_shared(tiny_dataset):
    path = next((tiny_dataset / "dataset").rglob("*.nii.gz"))
    volume = read_raw_volume(path)  # its checks converted the step-4 sample
    assert list(volume._samples) == [4]
    for step in (4, 8, 12):
        fresh = rescaled_to_hu(volume.data[:, ::step, ::step], volume.slope, volume.intercept)
        assert np.array_equal(volume.hu_sample(step), fresh)
    assert list(volume._samples) == [4]
    assert np.array_equal(volume.hu_sample(2), rescaled_to_hu(volume.data[:, ::2, ::2], volume.slope,
                                                              volume.intercept))


WORKER_SCRIPT = """
import pickle, sys
from ctplatform.data.prepare_ray import prepare_batch  # what a Ray worker imports to run a task
from ctplatform.data.preprocess import PreprocessSettings
tasks = pickle.loads(sys.stdin.buffer.read())
results = prepare_batch(tasks, sys.argv[1], PreprocessSettings(image_size=32, num_slices=8), False)
print([r["status"] for r in results], "pandas" in sys.modules)
"""


@pytest.mark.timeout(120)
def test_a_ray_worker_prepares_without_importing_pandas(tiny_dataset, tmp_path):
    """pandas is ~1 s of each Ray worker's cold start before its first volume, and decoding never needs it."""
    tasks = discover_tasks(tiny_dataset)[:2]
    assert all(t.metadata is not None for t in tasks)  # VolumeMetadata travels with the task, and unpickles
    out = open_cache(tmp_path / "cache", SETTINGS)
    done = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, out], input=pickle.dumps(tasks), capture_output=True,
                          timeout=100, check=True)
    assert done.stdout.decode().split() == ["['ok',", "'ok']", "False"]
