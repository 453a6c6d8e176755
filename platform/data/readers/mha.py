"""MetaImage volumes (.mha: the header and the image data in one file, optionally zlib-compressed).

A MetaImage header is `Key = Value` text lines up to `ElementDataFile = LOCAL`. The format has no magic bytes:
a file is taken as MetaImage when it starts with one of the usual first keys (ObjectType, NDims), or is named
`.mha` and has an `ElementDataFile` line near its start.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO

import numpy as np

from ctplatform.data.errors import CorruptDataError, UnusableContentError
from ctplatform.data.readers.base import VolumeHeader, VolumeReader

MHA_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16, "MET_USHORT": np.uint16,
    "MET_INT": np.int32, "MET_UINT": np.uint32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}
MAX_HEADER_BYTES = 64 * 1024


class MetaImageReader(VolumeReader):
    format = "mha"
    suffixes = (".mha",)

    def can_read(self, head: bytes, name: str) -> bool:
        if head[:4].lower() in (b"obje", b"ndim"):
            return True
        return name.lower().endswith(self.suffixes) and b"ElementDataFile" in head

    def read_header(self, stream: BinaryIO, label: str) -> VolumeHeader:
        fields = _header_fields(stream, label)
        if fields["ElementDataFile"] != "LOCAL":
            raise UnusableContentError(label, "MetaImage with an external data file is not supported; use a single "
                                              ".mha")
        if fields.get("HeaderSize", "0").strip() not in ("0", ""):
            # MetaIO skips HeaderSize bytes (-1: reads the data from the end of the file): neither is what a
            # one-file .mha writer produces, and honouring it lets a header point anywhere
            raise UnusableContentError(label, f"MetaImage HeaderSize = {fields['HeaderSize']} is not supported (a "
                                              "single .mha has its image data right after the header)")
        try:
            shape = tuple(int(v) for v in fields.get("DimSize", "").split())
            if int(fields.get("ElementNumberOfChannels", "1")) != 1:
                raise UnusableContentError(label, "multi-channel MetaImage: a CT volume has one channel")
            element = fields.get("ElementType", "")
            if element not in MHA_TYPES:
                raise UnusableContentError(label, f"unsupported MetaImage ElementType {element!r}")
            big_endian = (fields.get("ElementByteOrderMSB") or fields.get("BinaryDataByteOrderMSB", "False")) == "True"
            dtype = np.dtype(MHA_TYPES[element]).newbyteorder(">" if big_endian else "<")
            spacing = [float(v) for v in fields.get("ElementSpacing", fields.get("ElementSize", "1 1 1")).split()]
            origin = [float(v) for v in fields.get("Offset", fields.get("Origin", "0 0 0")).split()]
            matrix = [float(v) for v in fields.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]
        except ValueError as exc:
            raise CorruptDataError(label, f"malformed MetaImage header ({exc})") from exc
        if len(spacing) < 3 or len(origin) < 3 or len(matrix) < 9:
            raise CorruptDataError(label, "MetaImage header lacks 3-D spacing, offset or TransformMatrix")
        # MetaIO's TransformMatrix lists the direction cosines of each voxel axis in turn (ITK's direction matrix,
        # transposed); ITK's world is LPS, NIfTI's is RAS: flip x and y.
        direction = np.array(matrix[:9], dtype=np.float64).reshape(3, 3).T
        affine = np.eye(4)
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing[:3])
        affine[:3, 3] = lps_to_ras @ np.asarray(origin[:3])
        compressed = fields.get("CompressedData", "False") == "True"
        return VolumeHeader(self.format, compressed, shape, dtype, tuple(spacing[:3]), affine)

    def data_stream(self, stream: BinaryIO, header: VolumeHeader, dims: tuple[int, int, int], label: str) -> BinaryIO:
        if header.compressed:
            return CappedInflater(stream, header.nbytes, label)
        return stream


def _header_fields(stream: BinaryIO, label: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    consumed = 0
    while True:
        line = stream.readline(MAX_HEADER_BYTES)
        consumed += len(line)
        if not line or consumed > MAX_HEADER_BYTES:
            raise CorruptDataError(label, "MetaImage header has no ElementDataFile line")
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            raise CorruptDataError(label, f"malformed MetaImage header line {line[:60]!r}")
        key, value = key.strip(), value.strip()
        fields[key] = value
        if key == "ElementDataFile":
            return fields


class CappedInflater(io.RawIOBase):
    """The zlib/gzip-compressed image data of `stream` as a readable stream that never produces more than `nbytes`
    (bomb-safe), inflated only as far as it is read."""

    def __init__(self, stream: BinaryIO, nbytes: int, label: str):
        self.stream, self.left, self.label = stream, nbytes, label
        self.inflater = zlib.decompressobj(wbits=47)  # 32 + 15: accept zlib or gzip headers

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        chunks: list[bytes] = []
        try:
            while size > 0 and not self.inflater.eof:
                pending = self.inflater.unconsumed_tail or self.stream.read(1 << 20)
                if not pending:
                    break
                out = self.inflater.decompress(pending, size)
                chunks.append(out)
                size -= len(out)
                self.left -= len(out)
        except zlib.error as exc:
            raise CorruptDataError(self.label, f"corrupt compressed data ({exc})") from exc
        return b"".join(chunks)
