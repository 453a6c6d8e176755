"""An upload as the readers take it: a byte range of a file on disk, or of bytes in memory, opened as a seekable
binary stream as often as a reader needs one.

The HTTP service keeps a small request body in memory and spools a large one to a temporary file; a multipart
file part is a window of either. Both reach the readers as a :class:`FileRange`, so there is one reading path:
every pass (format detection, the header, each read of the image data) opens its own stream over the range, with
its own position, and nothing is loaded whole. Position 0 of a stream is the range's first byte.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

OPEN_BUFFER = 1 << 20  # the buffered reader's size: readers ask for a few KiB to a plane at a time


class FileRange:
    """Bytes [start, start + length) of `backing` (a file path, or bytes); `name` labels it in errors."""

    def __init__(self, backing: str | os.PathLike | bytes, start: int = 0, length: int | None = None,
                 name: str | None = None):
        if isinstance(backing, bytes | bytearray | memoryview):
            backing = bytes(backing)  # bytes are shared, not copied
            total = len(backing)
        else:
            backing = Path(backing)
            total = backing.stat().st_size
        if length is None:
            length = total - start
        if start < 0 or length < 0 or start + length > total:
            raise ValueError(f"range [{start}, {start + length}) lies outside the {total:,} bytes of its backing")
        self.backing, self.start, self.size = backing, start, length
        self.name = name or (str(backing) if isinstance(backing, Path) else "<upload>")

    def __repr__(self) -> str:
        where = "memory" if isinstance(self.backing, bytes) else str(self.backing)
        return f"FileRange({self.name!r}: {self.size:,} bytes at {self.start:,} of {where})"

    def open(self) -> BinaryIO:
        """A new seekable binary stream over the range (its own position and file handle: safe beside others)."""
        if isinstance(self.backing, bytes):
            raw: BinaryIO = io.BytesIO(self.backing)
        else:
            raw = open(self.backing, "rb", buffering=0)  # noqa: SIM115 (closed with the stream returned)
        return io.BufferedReader(_RangeIO(raw, self.start, self.size), OPEN_BUFFER)

    def head(self, count: int) -> bytes:
        """The first `count` bytes (fewer if the range is shorter)."""
        with self.open() as stream:
            return stream.read(count)

    def read_bytes(self) -> bytes:
        """The whole range in memory: for small uploads only (a .npy slice, a test)."""
        with self.open() as stream:
            return stream.read()

    def window(self, start: int, length: int, name: str | None = None) -> FileRange:
        """The part [start, start + length) of this range, as a range of the same backing."""
        if start < 0 or length < 0 or start + length > self.size:
            raise ValueError(f"window [{start}, {start + length}) lies outside a range of {self.size:,} bytes")
        return FileRange(self.backing, self.start + start, length, name or self.name)


class _RangeIO(io.RawIOBase):
    """The raw stream under `FileRange.open`: `raw`'s bytes [start, start + size) seen as a whole file."""

    def __init__(self, raw: BinaryIO, start: int, size: int):
        self.raw, self.start, self.size, self.position = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        if count == 0:
            return 0
        self.raw.seek(self.start + self.position)
        got = self.raw.readinto(memoryview(buffer)[:count])
        self.position += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()
