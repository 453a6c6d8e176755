"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _process_umask() -> int:
    # The umask can only be read by setting it; set it straight back (a benign race with concurrent file creation).
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_atomic(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any], *, keep_cached: bool = True) -> Path:
    """Call `writer(binary file)` on a temp file beside `path` (same file system: the rename is atomic), fsync,
    give it the mode a plain open() would (mkstemp makes 0600 files), then rename it over `path`.

    `keep_cached=False` drops the file's pages from the page cache once they are on disk, for a bulk writer whose
    output is read later, elsewhere, or not at all (`prepare`): its cache then stops evicting what the machine
    still reads, and the next file's write reuses the pages just freed. On this project's 2-core VM a 3.2 MB
    file's write and fsync cost 16 ms of system time in pages the kernel had to fault in afresh, 1 ms with
    them dropped (BENCHMARKS.md, prepare)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
            if not keep_cached and hasattr(os, "posix_fadvise"):  # macOS has none
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.chmod(tmp, 0o666 & ~_process_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, keep_cached: bool = True) -> Path:
    return write_atomic(path, lambda handle: handle.write(data), keep_cached=keep_cached)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any) -> Path:
    """Strict JSON (NaN is refused: other tools cannot read it), keys in insertion order, trailing newline."""
    return write_text_atomic(path, json.dumps(value, indent=2, allow_nan=False) + "\n")
