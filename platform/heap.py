"""How this process's C heap (glibc's malloc) keeps or returns large buffers.

- `trim_heap`: give freed memory back after a large request. Serve hands a request body to the ingress replica
  as messages of about 64 KiB, which glibc serves from its heap arenas and keeps when they are freed; the volume
  is then decoded in the decode threads, whose allocations come from other arenas. Without a trim the replica's
  resident memory holds both at once, and keeps the high-water mark after the request
  (`benchmarks/serve_memory.py`).
- `reuse_large_buffers`: the opposite, for a batch job that decodes one volume after another. glibc maps every
  allocation above 32 MiB afresh (its largest dynamic mmap threshold) and unmaps it when freed, so the kernel
  faults in and zeroes every page of each volume's decoded buffer again: a 256x256x128 float32 volume (33.5 MB)
  cost 16 ms of system time a volume, a third of its inflate (BENCHMARKS.md, prepare). Above a raised threshold
  the freed buffer stays in the heap and the next volume reuses its pages.

Both are no-ops where the C library has no such calls (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Volumes up to this size are decoded into reused heap memory: above a CT-RATE volume (512x512x~330 int16, 165 MB,
# or float32, 330 MB), below glibc's limit for the setting.
REUSED_BUFFER_BYTES = 1 << 30


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Return the allocator's free memory to the operating system; True if anything was returned. Blocking for a
    few milliseconds: call it off the event loop."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


@functools.cache
def reuse_large_buffers() -> bool:
    """Keep freed buffers up to REUSED_BUFFER_BYTES in the heap for the process's next allocation (process-wide,
    for the rest of its life: for a process that owns the job, as a `prepare` worker does). True if set."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    # The trim threshold too: a freed buffer at the top of the heap would otherwise be returned at once.
    return bool(mallopt(M_MMAP_THRESHOLD, REUSED_BUFFER_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   2 * REUSED_BUFFER_BYTES))
