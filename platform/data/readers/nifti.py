"""NIfTI-1 and NIfTI-2 volumes (.nii, and .nii.gz inflated as a stream), read by their magic bytes."""

from __future__ import annotations

import io
from typing import BinaryIO

import nibabel as nib
from isal import igzip

from ctplatform.data.errors import CorruptDataError, UnsupportedFormatError, UnusableContentError
from ctplatform.data.readers.base import VolumeHeader, VolumeReader, read_exact
from ctplatform.data.readers.inflate import inflate_whole

GZIP_MAGIC = b"\x1f\x8b"
# sizeof_hdr, the first field, in either byte order: 348 (NIfTI-1) or 540 (NIfTI-2)
NIFTI_MAGICS = (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")


class NiftiReader(VolumeReader):
    format = "nifti"
    suffixes = (".nii", ".nii.gz")

    def can_read(self, head: bytes, name: str) -> bool:
        return head[:2] == GZIP_MAGIC or head[:4] in NIFTI_MAGICS

    def decoded(self, stream: BinaryIO, head: bytes) -> BinaryIO:
        if head[:2] == GZIP_MAGIC:
            # ISA-L's inflate (python-isal) is ~2x zlib's on CT volumes, and reads as GzipFile does: only what is
            # asked for is inflated, so the header (and the limits check on it) comes before any image data.
            return igzip.GzipFile(fileobj=stream, mode="rb")
        return stream

    def read_header(self, stream: BinaryIO, label: str) -> VolumeHeader:
        first = read_exact(stream, 4, label)
        sizeof = int.from_bytes(first, "little")
        if sizeof not in (348, 540):
            sizeof = int.from_bytes(first, "big")
        if sizeof not in (348, 540):
            raise UnsupportedFormatError(label, "not a NIfTI file (bad header size)")
        header_class = nib.Nifti1Header if sizeof == 348 else nib.Nifti2Header
        header_bytes = first + read_exact(stream, sizeof - 4, label)
        try:
            header = header_class.from_fileobj(io.BytesIO(header_bytes), check=True)
            dtype = header.get_data_dtype()
            shape = tuple(int(d) for d in header.get_data_shape())
            zooms = tuple(float(z) for z in header.get_zooms()[:3])
            offset = int(header.get_data_offset())
            slope, intercept = header.get_slope_inter()
            coded = header.get_sform(coded=True)[1] or header.get_qform(coded=True)[1]
            affine = header.get_best_affine() if coded else None
        except Exception as exc:  # nibabel raises several types for a malformed header
            raise CorruptDataError(label, f"malformed NIfTI header ({exc})") from exc
        if dtype.fields is not None or dtype.kind not in "iuf":
            raise UnusableContentError(label, f"unsupported voxel type {dtype}")
        if offset < sizeof:
            offset = sizeof + 4 if sizeof == 348 else sizeof  # NIfTI-1 single file: data after the 4 extension bytes
        return VolumeHeader(self.format, isinstance(stream, igzip.GzipFile), shape, dtype, zooms, affine,
                            slope, intercept, skip=offset - sizeof)

    def whole_image(self, stream: BinaryIO, start: int, data: BinaryIO, size: int) -> memoryview | None:
        if not isinstance(data, igzip.GzipFile):
            return None  # a .nii: its image is read as stored
        offset = data.tell()  # the header and its extensions, already inflated and checked
        whole = inflate_whole(stream, start, offset + size)
        return memoryview(whole)[offset:] if whole is not None else None
