"""The members of a `.zip` holding one DICOM series, every archive trap refused before a member is inflated.

Everything is decided from the archive's central directory first: the entry count and the total uncompressed size
against the read's caps, how far the archive expands (a large series compressed beyond what CT data allows is a
zip bomb), names that climb out of the archive (`../`, absolute paths, drive letters), symlinks, nested archives and
encrypted members. Python's zipfile then inflates a member to at most the size its directory entry declares (and
checks its CRC).

Members are never held: each is a :class:`MemberFile`, a file object that opens (inflates) the member when read and
lets it go when released, so a series' headers are parsed one member at a time and its slices decoded one at a
time (:func:`~ctplatform.data.readers.dicom.stream_grid`); memory follows a member, not the archive.
"""

from __future__ import annotations

import stat
import struct
import threading
import zipfile
from pathlib import PurePosixPath
from typing import BinaryIO

from ctplatform.data.errors import CorruptDataError, DataTooLargeError, UnsupportedFormatError

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end-of-directory record
NESTED_ARCHIVE_SUFFIXES = (".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".bz2", ".xz")
NESTED_ARCHIVE_MAGICS = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh", b"\xfd7zXZ")
# Deflated CT slices shrink 2-10x (noise keeps them from shrinking much more); a zip bomb expands ~1000x. The ratio
# is only looked at for archives declaring more than RATIO_FLOOR_BYTES, so small test or blank series are not refused.
MAX_EXPANSION = 100
RATIO_FLOOR_BYTES = 64 << 20
# zipfile builds an object per central-directory entry before its caller can count them: a directory of millions
# of empty entries (100 bytes each in the upload) would take gigabytes. Its size is checked first, from the end
# record: at most this many bytes per allowed member (46 fixed, the name, extra fields; real ones take ~100).
DIRECTORY_BYTES_PER_MEMBER = 1024
END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entries here, entries, directory size, offset, comment
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGICS


class MemberFile:
    """One member of an open archive as a seekable file object (what pydicom reads a dataset from): the member is
    opened when first read, after its leading bytes are checked for a nested archive, and closed by `release`
    (reopened, at the same position, if read again: a deferred value read later)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str):
        self.archive, self.info, self.label = archive, info, label
        self.name = info.filename
        self._handle: BinaryIO | None = None
        self._position = 0
        self._lock = threading.Lock()

    def _opened(self) -> BinaryIO:
        if self._handle is None:
            try:
                handle = self.archive.open(self.info)
                head = handle.read(8)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise CorruptDataError(f"{self.label}/{self.name}", "corrupt or unsupported zip member "
                                                                    f"({type(exc).__name__})") from None
            if head.startswith(NESTED_ARCHIVE_MAGICS):
                handle.close()
                raise UnsupportedFormatError(f"{self.label}/{self.name}", "nested archives are not read: zip the "
                                                                          "series' DICOM files themselves")
            handle.seek(self._position)
            self._handle = handle
        return self._handle

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            try:
                return self._opened().read(size)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:  # a CRC mismatch, a truncated stream
                raise CorruptDataError(f"{self.label}/{self.name}", "corrupt zip member "
                                                                    f"({type(exc).__name__})") from None

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._lock:
            return self._opened().seek(offset, whence)

    def tell(self) -> int:
        with self._lock:
            return self._handle.tell() if self._handle is not None else self._position

    def release(self) -> None:
        """Close the inflating stream (its buffers and decompressor go with it)."""
        with self._lock:
            if self._handle is not None:
                self._position = self._handle.tell()
                self._handle.close()
                self._handle = None


def open_archive(stream: BinaryIO, label: str, max_members: int, max_bytes: int) -> list[MemberFile]:
    """The regular files of the archive in `stream`, in name order (directories skipped), checked as the module says;
    nothing inflated yet. The archive stays open as long as its members are referenced."""
    _check_directory(stream, label, max_members)
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptDataError(label, f"not a readable zip archive ({type(exc).__name__})") from None
    infos = [info for info in archive.infolist() if not info.is_dir()]
    if len(infos) > max_members:
        raise DataTooLargeError(label, f"the archive holds {len(infos):,} files, above the limit of {max_members:,}")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise DataTooLargeError(label, f"the archive declares {declared:,} uncompressed bytes, above the limit of "
                                       f"{max_bytes:,}")
    compressed = sum(info.compress_size for info in infos)
    if declared > RATIO_FLOOR_BYTES and declared > MAX_EXPANSION * max(compressed, 1):
        raise DataTooLargeError(label, f"the archive expands {compressed:,} bytes into {declared:,} (more than "
                                       f"{MAX_EXPANSION}x, far beyond what CT images compress to): refused as a zip "
                                       "bomb")
    for info in infos:
        _check_entry(info, label)
    return [MemberFile(archive, info, label) for info in sorted(infos, key=lambda i: i.filename)]


def _check_directory(stream: BinaryIO, label: str, max_members: int) -> None:
    """Refuse an archive whose end record declares more entries, or a larger central directory, than `max_members`
    allow, before zipfile reads the directory. An archive without a readable end record is left to zipfile (which
    refuses it)."""
    start = stream.tell()
    try:
        end = stream.seek(0, 2)
        tail_start = max(start, end - END_RECORD.size - 0xFFFF)
        stream.seek(tail_start)
        tail = stream.read(end - tail_start)
    finally:
        stream.seek(start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < END_RECORD.size:
        return
    _, _, _, _, entries, size, _, _ = END_RECORD.unpack_from(tail, at)
    locator = at - ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        offset = ZIP64_LOCATOR.unpack_from(tail, locator)[2]
        stream.seek(start + offset)
        record = stream.read(ZIP64_END_RECORD.size)
        stream.seek(start)
        if len(record) == ZIP64_END_RECORD.size and record[:4] == b"PK\x06\x06":
            _, _, _, _, _, _, _, entries, size, _ = ZIP64_END_RECORD.unpack(record)
    if entries > max_members:
        raise DataTooLargeError(label, f"the archive holds {entries:,} files, above the limit of {max_members:,}")
    if size > max_members * DIRECTORY_BYTES_PER_MEMBER:
        raise DataTooLargeError(label, f"the archive's directory takes {size:,} bytes, above the "
                                       f"{max_members * DIRECTORY_BYTES_PER_MEMBER:,} its {max_members:,} files may")


def _check_entry(info: zipfile.ZipInfo, label: str) -> None:
    name = info.filename
    where = f"{label}/{name}"
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsupportedFormatError(label, f"member {name!r} points outside the archive (absolute path or '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsupportedFormatError(where, "symbolic links are not read from archives")
    if info.flag_bits & 0x1:
        raise UnsupportedFormatError(where, "encrypted zip members are not supported")
    if name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
        raise UnsupportedFormatError(where, "nested archives are not read: zip the series' DICOM files themselves")
