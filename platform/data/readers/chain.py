"""The one way to read a CT volume: pick the reader by what the file is, read within limits, convert to HU.

`read_volume` serves `prepare` (trusted files on disk), `predict` and the HTTP service (untrusted uploads, small
ones in memory and large ones spooled to disk, each a :class:`~.file_range.FileRange`), so it is written for the
last: the format is chosen from the leading bytes (the name only where a format has no magic bytes), the header
is read and checked against :class:`ReadLimits` before any image data, exactly the declared bytes are then read or
inflated, and the result is checked (finite values, not blank, lung field).
A DICOM series is a folder (read by :func:`~.dicom.read_dicom_folder`) or a `.zip` (a stream like any file).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ctplatform.data.errors import CorruptDataError, DataNotFoundError, UnsupportedFormatError, UnusableContentError
from ctplatform.data.hounsfield import chest_check, hounsfield_rescale, rescale_sample
from ctplatform.data.metadata import DEFAULT_Z_SPACING_MM, VolumeMetadata
from ctplatform.data.readers.base import ReadLimits, VolumeHeader, VolumeReader, stored_planes
from ctplatform.data.readers.dicom import (
    DicomHeader,
    DicomReader,
    checked_folder_header,
    decode_series,
    decode_series_hu,
    dicom_folder_header,
    read_dicom_folder,
)
from ctplatform.data.readers.file_range import FileRange
from ctplatform.data.readers.mha import MetaImageReader
from ctplatform.data.readers.nifti import NiftiReader
from ctplatform.data.readers.orientation import canonical_flips, to_canonical
from ctplatform.data.readers.volume import RawVolume, Volume

READERS: tuple[VolumeReader, ...] = (NiftiReader(), MetaImageReader(), DicomReader())
HEAD_BYTES = 4096  # what format detection looks at
VolumeSource = str | os.PathLike | bytes | BinaryIO | FileRange


def read_volume(
    source: VolumeSource,
    *,
    name: str | None = None,
    metadata: VolumeMetadata | None = None,
    limits: ReadLimits | None = None,
) -> Volume:
    """Read a volume in HU: float32 (slices, rows, cols), inferior to superior, spacing (z, y, x) mm.

    `source` is a path (a file, or a folder holding a DICOM series), the bytes of a file, a seekable binary
    stream, or a :class:`~.file_range.FileRange` (an upload: opened afresh for each pass); `name` names bytes and
    streams (in error messages, and to recognise a format by its suffix).
    `metadata` (CT-RATE's metadata CSV row) gives the rescale of original-format volumes; `limits` caps what the
    header may declare (default: :class:`ReadLimits`()).
    Raises a :class:`~ctplatform.data.errors.DataFormatError` subclass for each kind of problem."""
    limits = limits or ReadLimits()
    if _is_folder(source):
        label = name or str(source)
        return _dicom_volume(checked_folder_header(Path(source), label, limits), metadata, limits, label)
    with opened(source, name) as (stream, label):
        head, reader = _detect(stream, label)
        if isinstance(reader, DicomReader):  # decoded while the stream is open (a zip's members are read from it)
            return _dicom_volume(reader.checked_header(stream, label, limits), metadata, limits, label)
        header, data = reader.read(stream, head, label, limits)
    return _checked_volume(data, header, metadata, limits, label).to_volume()


def _dicom_volume(header: DicomHeader, metadata: VolumeMetadata | None, limits: ReadLimits, label: str) -> Volume:
    """A whole series in HU: decoded straight to canonical float32 HU where only flips orient it (axial series, one
    rescale, slices on the grid), else through the stored values as every other read."""
    canonical = canonical_flips(header.affine)
    hu = decode_series_hu(header, label, canonical[0]) if canonical is not None else None
    if hu is None:
        return _checked_volume(decode_series(header, label), header, metadata, limits, label).to_volume()
    volume = RawVolume(hu, 1.0, 0.0, canonical[1], "header", list(header.notes))
    _check_content(volume, limits, label)
    return Volume(hu=hu, spacing=volume.spacing, hu_source=volume.hu_source, notes=volume.notes)


def read_raw_volume(
    source: VolumeSource,
    *,
    name: str | None = None,
    metadata: VolumeMetadata | None = None,
    limits: ReadLimits | None = None,
) -> RawVolume:
    """As `read_volume`, with the HU conversion left to the caller (`RawVolume.hu`)."""
    limits = limits or ReadLimits()
    if _is_folder(source):
        label = name or str(source)
        header, data = read_dicom_folder(Path(source), label, limits)  # type: ignore[arg-type]
        return _checked_volume(data, header, metadata, limits, label)
    with opened(source, name) as (stream, label):
        head, reader = _detect(stream, label)
        header, data = reader.read(stream, head, label, limits)
    return _checked_volume(data, header, metadata, limits, label)


@dataclass
class PlaneStream:
    """A NIfTI or MetaImage volume's stored (y, x) planes along its z axis, read (inflated) one at a time."""

    header: VolumeHeader
    dims: tuple[int, int, int]  # (x, y, z) as stored
    label: str
    planes: Iterator[np.ndarray]


@contextmanager
def plane_stream(source: VolumeSource, *, name: str | None = None,
                 limits: ReadLimits | None = None) -> Iterator[PlaneStream | None]:
    """The volume at `source` as a :class:`PlaneStream`, its header checked against `limits` first; None for a DICOM
    series (its images are separate files: read it with `read_raw_volume`)."""
    limits = limits or ReadLimits()
    if _is_folder(source):
        yield None
        return
    with opened(source, name) as (stream, label):
        head, reader = _detect(stream, label)
        if isinstance(reader, DicomReader):
            yield None
            return
        header, dims, data = reader.open_data(stream, head, label, limits)
        yield PlaneStream(header, dims, label, stored_planes(data, header.dtype, dims, label))


@contextmanager
def dicom_series(source: VolumeSource, *, name: str | None = None,
                 limits: ReadLimits | None = None) -> Iterator[tuple[DicomHeader, str] | None]:
    """The checked header of the DICOM series at `source` (a folder, a `.zip`, an Enhanced CT `.dcm`) and its label,
    the source kept open while the caller decodes it (`decode_series`, `stream_grid`); None for any other format."""
    limits = limits or ReadLimits()
    if _is_folder(source):
        label = name or str(source)
        yield checked_folder_header(Path(source), label, limits), label  # type: ignore[arg-type]
        return
    with opened(source, name) as (stream, label):
        _head, reader = _detect(stream, label)
        yield (reader.checked_header(stream, label, limits), label) if isinstance(reader, DicomReader) else None


def read_header(source: VolumeSource, *, name: str | None = None) -> VolumeHeader:
    """Only what the header declares (a .nii.gz inflates a few hundred bytes; a DICOM series parses every file's
    header): no limits, no image data."""
    if _is_folder(source):
        return dicom_folder_header(Path(source), name or str(source))  # type: ignore[arg-type]
    with opened(source, name) as (stream, label):
        head, reader = _detect(stream, label)
        return reader.read_header(reader.decoded(stream, head), label)


def reader_for(head: bytes, name: str) -> VolumeReader:
    """The first registered reader that reads a file starting with `head` and named `name`."""
    for reader in READERS:
        if reader.can_read(head, name):
            return reader
    raise UnsupportedFormatError(name, "not a NIfTI (.nii, .nii.gz), MetaImage (.mha) or DICOM file (a series "
                                       "folder, a .zip of one, or an Enhanced CT .dcm)")


@contextmanager
def opened(source: VolumeSource, name: str | None = None) -> Iterator[tuple[BinaryIO, str]]:
    """`source` (not a folder) as a seekable binary stream from its first byte, and its label; closed after."""
    if isinstance(source, FileRange):  # an upload: spooled to disk, or small and in memory, or a part of either
        label = name or source.name
        if not source.size:
            raise CorruptDataError(label, "empty file")
        with source.open() as stream:
            yield stream, label
    elif isinstance(source, bytes | bytearray | memoryview):
        label = name or "<upload>"
        if not len(source):
            raise CorruptDataError(label, "empty file")
        yield io.BytesIO(source), label
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise DataNotFoundError(path, "file not found")
        with open(path, "rb") as handle:
            yield handle, label
    else:
        if not source.seekable():
            raise TypeError("read_volume needs a seekable binary stream (an open file or io.BytesIO)")
        yield source, name or str(getattr(source, "name", "<stream>"))


def _is_folder(source: VolumeSource) -> bool:
    return isinstance(source, str | os.PathLike) and Path(source).is_dir()


def _detect(stream: BinaryIO, label: str) -> tuple[bytes, VolumeReader]:
    start = stream.tell()
    head = stream.read(HEAD_BYTES)
    stream.seek(start)
    if len(head) < 4:
        raise CorruptDataError(label, "empty or truncated file")
    return head, reader_for(head, label)


def _checked_volume(data: np.ndarray, header: VolumeHeader, metadata: VolumeMetadata | None, limits: ReadLimits,
                    label: str) -> RawVolume:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise UnusableContentError(label, "image contains NaN or infinite values")
    if header.rescale_declared:  # DICOM: the file's own rescale (per slice, already applied where they differ)
        slope, intercept, source = float(header.slope or 1.0), float(header.intercept or 0.0), "header"
        notes = list(header.notes) if isinstance(header, DicomHeader) else []
    else:
        sample_min = float(rescale_sample(data).min())
        slope, intercept, source, notes = hounsfield_rescale(sample_min, header.slope, header.intercept, metadata)
    data, spacing = to_canonical(data, header.affine, header.spacing, notes)
    if metadata is not None and not header.rescale_declared:  # a DICOM header's geometry is its own
        if metadata.z_spacing is not None:
            spacing = (metadata.z_spacing, spacing[1], spacing[2])
        elif not spacing[0] > 0:
            notes.append(f"ZSpacing missing in metadata and header: assuming {DEFAULT_Z_SPACING_MM} mm")
            spacing = (DEFAULT_Z_SPACING_MM, spacing[1], spacing[2])
    volume = RawVolume(data, slope, intercept, spacing, source, notes)
    _check_content(volume, limits, label)
    return volume


def _check_content(volume: RawVolume, limits: ReadLimits, label: str) -> None:
    """Refuse a blank image or unusable spacing; note a volume that does not look like a chest."""
    sample = volume.hu_sample()
    if float(sample.max()) == float(sample.min()) and float(volume.data.max()) == float(volume.data.min()):
        raise UnusableContentError(label, "image is constant (blank)")
    spacing = volume.spacing
    if limits.require_spacing and not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UnusableContentError(label, f"voxel spacing {tuple(float(s) for s in spacing)} mm is not finite and "
                                          "positive (NaN or zero pixdim in the header)")
    volume.notes.extend(chest_check(sample, step=1))
