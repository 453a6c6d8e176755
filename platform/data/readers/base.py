"""What every volume reader provides: a format check, a header, the image data; and the limits on one read.

A reader is a small class with `can_read(head, name)` (magic bytes, or the suffix where a format has no magic)
and two reading steps, `read_header` and `data_stream` (the image data as a stream of exactly the declared bytes).
`VolumeReader.open_data` runs them with the limits check in between, so every format is checked the same way: the
voxel count and image bytes the header declares are compared with :class:`ReadLimits` before any image data is
read, and exactly the declared bytes are then read or inflated (a gzip bomb's tail is never inflated), whole
(`VolumeReader.read`) or a z plane at a time (`stored_planes`).
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from isal import isal_zlib

from ctplatform.data.errors import CorruptDataError, DataTooLargeError, UnusableContentError

# 1024 x 1024 x 600: above any CT-RATE volume (at most 1024^2 x ~330 slices), far below a memory-exhausting one.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 600
# Bytes a header may put between itself and the image (NIfTI extensions, e.g. a DICOM header kept by a converter:
# kilobytes in practice). A vox_offset of gigabytes is how a small upload would make a reader inflate gigabytes.
DEFAULT_MAX_HEADER_SKIP = 16 << 20
SKIP_CHUNK = 1 << 20


@dataclass
class VolumeHeader:
    """What a volume file's header declares, read before any image data."""

    format: str  # "nifti", "mha" or "dicom"
    compressed: bool
    shape: tuple[int, ...]  # as declared, in the file's axis order (x fastest)
    dtype: np.dtype  # stored voxel type, with its byte order
    spacing: tuple[float, ...]  # voxel sizes along the file's axes, as declared (NIfTI pixdim, MetaImage spacing)
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS mm; None when the header sets no orientation
    slope: float | None = None  # the header's rescale (NIfTI scl_slope / scl_inter), None when it has none
    intercept: float | None = None
    skip: int = 0  # bytes between the end of the header and the image data (NIfTI extensions, never interpreted)
    # The slope/intercept are the file's own rescale to HU, applied as given even when they are 1 and 0 (DICOM's
    # RescaleSlope/RescaleIntercept); NIfTI's scl_slope 1, scl_inter 0 means "no scaling" and is not declared.
    rescale_declared: bool = False

    @property
    def itemsize(self) -> int:
        return int(self.dtype.itemsize)

    @property
    def voxels(self) -> int:
        return math.prod(self.shape) if self.shape else 0

    @property
    def nbytes(self) -> int:
        return self.voxels * self.itemsize


@dataclass(frozen=True)
class ReadLimits:
    """Caps on what one read may declare, decompress and hold, checked against the header before the image data.

    The defaults suit trusted files (`prepare`, `predict`); the HTTP service passes its own, stricter ones.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_decompressed_bytes: int | None = None  # image bytes a header may declare (what is inflated); None: no cap
    max_header_skip: int = DEFAULT_MAX_HEADER_SKIP  # bytes between the header and the image data
    # Refuse a NaN or infinite spacing in the header (even where an affine would supply another one) and a
    # resulting spacing that is not finite and positive. Off for `prepare`, which takes spacing from metadata.
    require_spacing: bool = False
    # A DICOM series: files in a folder or archive, and their total (uncompressed) bytes, checked before any is
    # parsed or inflated. 4096 slices and 4 GiB hold any CT series (CT-RATE's have at most ~330 slices of 512 KiB).
    max_series_files: int = 4096
    max_series_bytes: int = 4 << 30

    def __post_init__(self):
        if self.max_voxels < 1 or (self.max_decompressed_bytes is not None and self.max_decompressed_bytes < 1) \
                or self.max_series_files < 1 or self.max_series_bytes < 1:
            raise ValueError("max_voxels, max_decompressed_bytes, max_series_files and max_series_bytes must be "
                             "positive")

    def check(self, header: VolumeHeader, label: str) -> tuple[int, int, int]:
        """Refuse what the header declares beyond these limits; returns the image's 3 dimensions (x, y, z)."""
        if self.require_spacing and not all(math.isfinite(s) for s in header.spacing):
            raise UnusableContentError(label, f"the header's voxel spacing {header.spacing} is not finite (NaN "
                                              "pixdim)")
        if any(d < 0 for d in header.shape):
            raise CorruptDataError(label, f"the header declares a negative image dimension {header.shape}")
        if header.voxels > self.max_voxels:
            raise DataTooLargeError(label, f"the header declares {header.voxels:,} voxels {header.shape}, above the "
                                           f"limit of {self.max_voxels:,}")
        if header.skip > self.max_header_skip:
            raise DataTooLargeError(label, f"the header puts the image data {header.skip:,} bytes after its end "
                                           f"(vox_offset), above the limit of {self.max_header_skip:,}")
        if self.max_decompressed_bytes is not None and header.nbytes > self.max_decompressed_bytes:
            raise DataTooLargeError(label, f"the header declares {header.nbytes:,} bytes of image data, above the "
                                           f"decompression limit of {self.max_decompressed_bytes:,} bytes")
        dims = header.shape
        while len(dims) > 3 and dims[-1] == 1:
            dims = dims[:-1]
        if len(dims) != 3:
            raise UnusableContentError(label, f"a CT volume needs 3 dimensions, this image has shape {dims}")
        if min(dims) < 1:
            raise UnusableContentError(label, f"empty image (shape {dims})")
        return dims  # type: ignore[return-value]


class VolumeReader(ABC):
    """One file format. Subclasses say what they read (`can_read`) and how (`read_header`, `data_stream`)."""

    format: str
    suffixes: tuple[str, ...]

    @abstractmethod
    def can_read(self, head: bytes, name: str) -> bool:
        """Whether this reader reads a file that starts with `head` (up to 4 KiB) and is named `name`."""

    def decoded(self, stream: BinaryIO, head: bytes) -> BinaryIO:
        """The stream the header and data are read from (a format compressed as a whole wraps it)."""
        return stream

    @abstractmethod
    def read_header(self, stream: BinaryIO, label: str) -> VolumeHeader:
        """Read and check the header, leaving `stream` at its end."""

    def data_stream(self, stream: BinaryIO, header: VolumeHeader, dims: tuple[int, int, int], label: str) -> BinaryIO:
        """`stream` (just past the header) moved to the first image byte, as a stream of exactly the image data
        (a format that compresses only its image data inflates it here)."""
        skip_exact(stream, header.skip, label)  # extensions: passed over (capped by ReadLimits), never interpreted
        return stream

    def open_data(self, stream: BinaryIO, head: bytes, label: str,
                  limits: ReadLimits) -> tuple[VolumeHeader, tuple[int, int, int], BinaryIO]:
        """Header, limits check, then the stream of the image data: the one order every format is read in."""
        stream = self.decoded(stream, head)
        header = self.read_header(stream, label)
        dims = limits.check(header, label)
        if not header.compressed:  # stored as is: what the header declares must be in the file
            held = _bytes_left(stream)
            if held is not None and header.skip + header.nbytes > held:
                raise CorruptDataError(label, f"truncated: the header declares {header.skip + header.nbytes:,} bytes "
                                              f"after it, the file holds {held:,}")
        return header, dims, self.data_stream(stream, header, dims, label)

    def read(self, stream: BinaryIO, head: bytes, label: str, limits: ReadLimits) -> tuple[VolumeHeader, np.ndarray]:
        """The header and the whole image, (z, y, x) in the stored voxel type."""
        start = stream.tell()
        header, dims, data = self.open_data(stream, head, label, limits)
        size = dims[0] * dims[1] * dims[2] * header.itemsize
        payload = self.whole_image(stream, start, data, size)
        if payload is None:
            payload = read_exact(data, size, label)
        return header, voxels_zyx(payload, header.dtype, dims)

    def whole_image(self, stream: BinaryIO, start: int, data: BinaryIO, size: int) -> memoryview | None:
        """The `size` image bytes that `data` (from `open_data`) would give, read in one call where the format and
        the source allow it (`stream` is the source, the volume starting at its byte `start`); None: read them
        from `data`."""
        return None


def stored_planes(data: BinaryIO, dtype: np.dtype, dims: tuple[int, int, int], label: str) -> Iterator[np.ndarray]:
    """The image data of `data_stream` as (y, x) planes along z, one at a time (NIfTI and MetaImage store x
    fastest, so each z plane is contiguous)."""
    plane_bytes = dims[0] * dims[1] * dtype.itemsize
    for _ in range(dims[2]):
        yield np.frombuffer(read_exact(data, plane_bytes, label), dtype=dtype).reshape(dims[1], dims[0])


def _bytes_left(stream: BinaryIO) -> int | None:
    """Bytes from the position to the end of a seekable stream (None where it cannot be known)."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(here)
        return end - here
    except (OSError, ValueError):
        return None


def skip_exact(stream: BinaryIO, count: int, label: str) -> None:
    """Pass over `count` bytes (inflating them where the stream is compressed) without holding more than a chunk."""
    while count > 0:
        count -= len(read_exact(stream, min(count, SKIP_CHUNK), label))


def read_exact(stream: BinaryIO, count: int, label: str) -> bytes:
    """Exactly `count` bytes, or CorruptDataError (truncated file or corrupt compressed stream)."""
    try:
        data = stream.read(count)
    except (EOFError, OSError, zlib.error, isal_zlib.error) as exc:  # truncated or corrupt gzip stream
        raise CorruptDataError(label, f"corrupt or truncated compressed data ({exc})") from exc
    if len(data) != count:
        raise CorruptDataError(label, f"truncated: expected {count} bytes of image data, got {len(data)}")
    return data


def voxels_zyx(payload: bytes, dtype: np.dtype, dims: tuple[int, int, int]) -> np.ndarray:
    """Stored bytes (x fastest, as NIfTI and MetaImage both store them) -> a (z, y, x) array over the same memory."""
    return np.frombuffer(payload, dtype=dtype).reshape(dims[2], dims[1], dims[0])
