"""`prepare` over a data set kept in object storage (`--data-dir s3://...`).

Finding the volumes: one listing of the bucket prefix is mirrored as a local tree of empty placeholder files (the
label and metadata CSVs, which are small, are downloaded for real), so the same finder that understands CT-RATE's
layouts on disk (`ctplatform.data.paths`) finds them in the bucket; each found path is mapped back to its URI.

Reading one: the task that prepares a volume copies its file (or its DICOM series folder) to the node's temp
folder, reads it and deletes the copy, so a node needs room for the volumes it decodes at once, not the data set.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctplatform import storage
from ctplatform.data.errors import DataFormatError

# Files read whole while discovering the tasks (the rest are only listed).
_SMALL_FOLDERS = ("multi_abnormality_labels", "metadata")
_SMALL_NAMES = ("multi_abnormality_labels.csv",)


def mirror_listing(data_uri: str, local_root: Path) -> int:
    """Mirror the tree below `data_uri` into `local_root` (placeholders, CSVs for real); returns the file count."""
    files = storage.list_files(data_uri)
    for relative in files:
        target = local_root / relative
        parts = Path(relative).parts
        if any(folder in parts[:-1] for folder in _SMALL_FOLDERS) or parts[-1] in _SMALL_NAMES:
            storage.download(storage.join(data_uri, relative), target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    return len(files)


def to_uri(local: str | Path, local_root: Path, data_uri: str) -> str:
    return storage.join(data_uri, Path(local).relative_to(local_root).as_posix())


def rename_error(exc: DataFormatError, local_root: Path, data_uri: str) -> DataFormatError:
    """The same error, naming the URI instead of the placeholder tree."""
    path = exc.path.replace(str(local_root), data_uri.rstrip("/"))
    renamed = type(exc)(path, exc.problem, column=exc.column, row=exc.row)
    return renamed


@contextlib.contextmanager
def local_volume(path: str) -> Iterator[str]:
    """A local path for a volume: the path itself, or a temporary copy of a URI's file or folder."""
    if not storage.is_uri(path):
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix="ctplatform-volume-"))
    try:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        yield str(storage.download(path, folder / name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
