"""Checks shared by the object-storage tests of every protocol (tests/test_object_storage.py for s3://,
tests/test_object_storage_gcs.py for gs://)."""

from __future__ import annotations

from ctplatform import storage
from ctplatform.data.preprocess import PreprocessSettings

# The preprocessing of the session's `tiny_cache` (tests/conftest.py): a bucket's cache is compared with it.
SETTINGS = PreprocessSettings(image_size=32, num_slices=8)
SETTINGS_FLAGS = ["--image-size", "32", "--num-slices", "8"]


def one_error_line(capsys) -> str:
    """The single line a command printed on stderr (fails when it printed more or none)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def cache_files(location: str) -> dict[str, bytes]:
    """name -> bytes of every volume file of the slice cache at `location` (a URI or a local folder)."""
    return {name: storage.read_bytes(storage.join(location, name)) for name in storage.list_files(location)
            if name.startswith("volumes/")}


def local_cache_files(folder) -> dict[str, bytes]:
    """The same for a local cache folder, read with pathlib (independent of the storage helper)."""
    return {f"volumes/{p.parent.name}/{p.name}": p.read_bytes() for p in folder.glob("volumes/*/*.npy")}
