import os

# Keep torch and BLAS from oversubscribing the 2-core CI machine (several test processes share it).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import pytest


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

