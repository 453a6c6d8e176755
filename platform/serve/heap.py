"""Giving freed heap memory back to the operating system after a large request (glibc's `malloc_trim`).

Serve hands a request body to the ingress replica as messages of about 64 KiB, which glibc's allocator serves from
its heap arenas and keeps when they are freed; the volume is then decoded in the decode threads, whose allocations
come from other arenas. Without a trim the replica's resident memory holds both at once, and keeps the high-water
mark after the request. `benchmarks/serve_memory.py` measures the difference (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """libc's malloc_trim, or None where the C library has none (musl, macOS): trimming is then a no-op."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the allocator's free memory to the operating system; True if anything was returned. Blocking for a
    few milliseconds: call it off the event loop."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
