"""Atomic writes (`ctplatform.atomic`): what a reader sees, the file's mode, and whether its pages stay cached."""

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from ctplatform.atomic import write_bytes_atomic

pytestmark = pytest.mark.timeout(30)
PAGE = mmap.PAGESIZE


def resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore(2) over a private mapping of it)."""
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vector)


def file_system_type(path: Path) -> str:
    """The type of the mount that holds `path` (longest mount point that is a prefix of it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _device, point, fs_type, *_ = line.split()
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fs_type
    return kind


def test_a_write_replaces_the_file_whole_with_a_plain_files_mode(tmp_path):
    target = tmp_path / "deep" / "a.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]  # no temporary file left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise as Linux has them")
def test_keep_cached_false_leaves_the_written_pages_out_of_the_page_cache(tmp_path):
    if file_system_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a file in memory is its pages: there is no cache to leave")
    data = os.urandom(4 << 20)
    kept, dropped = tmp_path / "kept.npy", tmp_path / "dropped.npy"
    write_bytes_atomic(kept, data)
    write_bytes_atomic(dropped, data, keep_cached=False)
    pages = len(data) // PAGE
    assert resident_pages(kept) > pages * 0.9
    assert resident_pages(dropped) < pages * 0.1
    assert dropped.read_bytes() == data  # read back from the disk, whole
