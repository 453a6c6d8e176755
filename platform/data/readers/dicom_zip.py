"""The members of a `.zip` holding one DICOM series, read into memory with every archive trap refused first.

Everything is decided from the archive's central directory before a single member is inflated: the entry count
and the total uncompressed size against the read's caps, names that climb out of the archive (`../`, absolute
paths, drive letters), symlinks, nested archives and encrypted members. Python's zipfile then inflates a member to
at most the size its directory entry declares (and checks its CRC), so the declared total bounds what is held.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from ctplatform.data.errors import CorruptDataError, DataTooLargeError, UnsupportedFormatError

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end-of-directory record
NESTED_ARCHIVE_SUFFIXES = (".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".bz2", ".xz")
NESTED_ARCHIVE_MAGICS = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh", b"\xfd7zXZ")


@dataclass(frozen=True)
class Member:
    """One file of a series: its name inside the archive or folder (for messages) and its bytes."""

    name: str
    data: bytes


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGICS


def zip_members(stream: BinaryIO, label: str, max_members: int, max_bytes: int) -> list[Member]:
    """The regular files of the archive in `stream`, in name order (directories skipped)."""
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptDataError(label, f"not a readable zip archive ({type(exc).__name__})") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > max_members:
            raise DataTooLargeError(label, f"the archive holds {len(infos):,} files, above the limit of "
                                           f"{max_members:,}")
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise DataTooLargeError(label, f"the archive declares {declared:,} uncompressed bytes, above the limit "
                                           f"of {max_bytes:,}")
        for info in infos:
            _check_entry(info, label)
        members = []
        for info in sorted(infos, key=lambda i: i.filename):
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise CorruptDataError(f"{label}/{info.filename}", "corrupt or unsupported zip member "
                                                                   f"({type(exc).__name__})") from None
            if data[:4] in NESTED_ARCHIVE_MAGICS or data[:6] in NESTED_ARCHIVE_MAGICS:
                raise UnsupportedFormatError(f"{label}/{info.filename}", "nested archives are not read: zip the "
                                                                         "series' DICOM files themselves")
            members.append(Member(info.filename, data))
    return members


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
