import os

# Keep torch and BLAS from oversubscribing the 2-core CI machine (several test processes share it).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

# The object-store test servers' fixtures: s3_server, s3_bucket (tests/s3_server.py); gcs_server, gcs_bucket
# (tests/gcs_server.py)
pytest_plugins = ["s3_server", "gcs_server"]

# Every Ray this test session starts (in process, in `ctplatform` subprocesses, in Ray's own workers) keeps its
# session files under this folder, so the leftover check below sees this session's daemons only, never those of
# another Ray on the machine (a second test run, a user's cluster). Short: Ray's socket paths must stay < 108 bytes.
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
RAY_TEST_TMPDIR = os.environ["RAY_TMPDIR"]
# Whatever else the session writes to temporary or cache folders (pytest's tmp_path, Ray Train's per-worker
# checkpoint folders, node-local copies of bucket objects) lands under the same folder, in this process and in every
# process it starts, and goes with it when the session ends: runs on one machine do not fill its disk.
os.environ["TMPDIR"] = tempfile.tempdir = RAY_TEST_TMPDIR
os.environ.setdefault("CTPLATFORM_CACHE_DIR", os.path.join(RAY_TEST_TMPDIR, "ctplatform-cache"))
_EXIT_STATUS = pytest.StashKey[int]()


def ray_daemons() -> set[int]:
    """PIDs of the GCS servers and raylets (what a live local cluster consists of) this test session started."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith((b"/gcs_server", b"/raylet")) and any(
                    RAY_TEST_TMPDIR.encode() in arg for arg in cmdline[1:]):
                pids.add(int(entry.name))
    return pids


@pytest.fixture(autouse=True, scope="session")
def ray_session_files_are_removed():
    yield
    if RAY_TEST_TMPDIR.startswith("/tmp/rt"):
        shutil.rmtree(RAY_TEST_TMPDIR, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def no_ray_cluster_outlives_its_module():
    """A test module leaves no Ray session open and no GCS server or raylet it started behind (module-scoped, as
    some modules share one cluster across their tests). A leftover daemon is killed, so the modules after it start
    clean, and fails the module's last test."""
    before = ray_daemons()
    yield
    still_connected = False
    if "ray" in sys.modules:
        import ray

        still_connected = ray.is_initialized()
        if still_connected:
            ray.shutdown()
    deadline = time.time() + 60  # a loaded machine takes a while to stop a cluster
    while (left := ray_daemons() - before) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not still_connected, "a test of this module left ray.init() connected"
    assert not left, f"a test of this module left Ray daemons running (killed now): {sorted(left)}"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic CT-RATE tree (24 volumes, 32x32x16), shared read-only by the tests of a session."""
    from ctplatform.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(root, num_volumes=24, size=(32, 32, 16), seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny data set prepared in-process (8 slices of 32x32 per volume)."""
    from ctplatform.data.prepare import run_prepare
    from ctplatform.data.preprocess import PreprocessSettings

    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    run_prepare(tiny_dataset, out, PreprocessSettings(image_size=32, num_slices=8), executor="local", progress=False)
    return out



def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's own teardown once pytest has reported. After a session that started and
    stopped dozens of local Ray clusters, Ray's C++ log sink can fail while Python finalises (`std::bad_alloc`, then a
    segmentation fault: seen once in a fresh-clone CI run after all tests had passed), which would turn a passed run
    into a failed `make test`. Every cluster and server is shut down by then (checked after each module)."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
