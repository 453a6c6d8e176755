"""DICOM CT: a series folder, a `.zip` of one, or a single multi-frame (Enhanced CT) file, read as one volume.

Read in the chain's one order: the header pass (every file parsed with its pixel data deferred; the series chosen
by :mod:`.dicom_series`; the grid planned by :mod:`.dicom_geometry`) gives a :class:`DicomHeader` that the read's
limits check, then only the chosen images' pixel data is decoded (pydicom and its pylibjpeg plugins, in a thread
pool: decoding and file reads release the GIL), each with its own RescaleSlope/RescaleIntercept.

When every slice shares one rescale and the slices are the grid, the stored integers are returned with that
rescale (a `prepare` converts only the slices it keeps); otherwise each slice is converted to HU (in float64, as
ITK does, then float32) before resampling.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctplatform.data.errors import CorruptDataError, DataNotFoundError, DataTooLargeError, UnsupportedFormatError
from ctplatform.data.hounsfield import rescaled_to_hu
from ctplatform.data.readers.base import ReadLimits, VolumeHeader, VolumeReader
from ctplatform.data.readers.dicom_geometry import GridPlan, grid_slice, plan_grid, resample, shifted
from ctplatform.data.readers.dicom_series import DicomImage, MemberSource, images_of, member_label, parse_members
from ctplatform.data.readers.dicom_zip import MemberFile, is_zip, open_archive

DICOM_MAGIC_OFFSET = 128
DECODE_THREADS = 2  # 4 was slower than 2 on 2 cores (benchmarks/dicom_read.py)
NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass
class DicomHeader(VolumeHeader):
    """The header of a series: the chosen images and how they become the grid, beside the usual fields."""

    images: list[DicomImage] = field(default_factory=list)
    plan: GridPlan | None = None
    notes: list[str] = field(default_factory=list)
    # A zip's members are not held: this reads a member's dataset again, pixel data included, to decode it (None:
    # the images' own datasets are decoded, their deferred pixel data read from the file or bytes they came from).
    open_member: Callable[[str], Dataset] | None = None


def is_dicom_file(head: bytes) -> bool:
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


class DicomReader(VolumeReader):
    """A single DICOM file (an Enhanced CT multi-frame volume) or a zip of a series, from a stream."""

    format = "dicom"
    suffixes = (".dcm", ".zip")

    def can_read(self, head: bytes, name: str) -> bool:
        return is_dicom_file(head) or is_zip(head)

    def read_header(self, stream: BinaryIO, label: str, limits: ReadLimits | None = None) -> DicomHeader:
        limits = limits or ReadLimits()
        start = stream.tell()
        head = stream.read(DICOM_MAGIC_OFFSET + 4)
        stream.seek(start)
        if is_zip(head):
            return zip_series_header(stream, label, limits)
        return series_header([("", stream.read())], label)  # one Enhanced CT file: messages name it by its label

    def read(self, stream: BinaryIO, head: bytes, label: str, limits: ReadLimits) -> tuple[VolumeHeader, np.ndarray]:
        header = self.checked_header(stream, label, limits)
        return header, decode_series(header, label)

    def checked_header(self, stream: BinaryIO, label: str, limits: ReadLimits) -> DicomHeader:
        """The series header, checked against `limits` (nothing decoded yet)."""
        header = self.read_header(stream, label, limits)
        limits.check(header, label)
        return header


def read_dicom_folder(folder: Path, label: str, limits: ReadLimits) -> tuple[DicomHeader, np.ndarray]:
    """A folder holding one DICOM series (files in any subfolders; other files skipped), read within `limits`."""
    header = checked_folder_header(folder, label, limits)
    return header, decode_series(header, label)


def checked_folder_header(folder: Path, label: str, limits: ReadLimits) -> DicomHeader:
    """The folder's series header, checked against `limits` (nothing decoded yet)."""
    header = dicom_folder_header(folder, label, limits)
    limits.check(header, label)
    return header


def dicom_folder_header(folder: Path, label: str, limits: ReadLimits | None = None) -> DicomHeader:
    limits = limits or ReadLimits()
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue  # a link may point anywhere: only the folder's own files are read
        if path.is_file():
            files.append(path)
            if len(files) > limits.max_series_files:
                raise DataTooLargeError(label, f"the folder holds more than {limits.max_series_files:,} files")
    if not files:
        raise DataNotFoundError(label, "the folder holds no files")
    total = sum(path.stat().st_size for path in files)
    if total > limits.max_series_bytes:
        raise DataTooLargeError(label, f"the folder holds {total:,} bytes, above the limit of "
                                       f"{limits.max_series_bytes:,}")
    return series_header([(str(path.relative_to(folder)), path) for path in files], label)


def zip_series_header(stream: BinaryIO, label: str, limits: ReadLimits) -> DicomHeader:
    """The header of the series zipped in `stream` (which must stay open while the series is decoded): each member's
    header parsed as it is inflated, its pixel data passed over; decoding inflates a member again."""
    members = open_archive(stream, label, limits.max_series_files, limits.max_series_bytes)
    try:
        header = series_header([(member.name, member) for member in members], label)
    finally:
        for member in members:
            member.release()
    by_name = {member.name: member for member in members}

    def open_member(name: str) -> Dataset:
        member = by_name[name]
        fresh = MemberFile(member.archive, member.info, label)  # its own stream: decode threads read in parallel
        try:
            return pydicom.dcmread(fresh)
        finally:
            fresh.release()

    header.open_member = open_member
    return header


def series_header(sources: list[tuple[str, MemberSource]], label: str) -> DicomHeader:
    """Parse the members, choose the series' images and plan their grid: everything but the pixel data."""
    images, notes = images_of(parse_members(sources, label), label)
    for syntax in sorted({str(image.dataset.file_meta.get("TransferSyntaxUID", "")) for image in images}):
        _check_decodable(syntax, label)
    plan = plan_grid([image.geometry for image in images], label)
    rows, cols = images[0].geometry.shape
    dtypes = {_stored_dtype(image.dataset, label) for image in images}
    one_rescale = len({(image.slope, image.intercept) for image in images}) == 1
    as_stored = one_rescale and len(dtypes) == 1 and not plan.resampled
    dtype = dtypes.pop() if as_stored else np.dtype(np.float32)
    slope, intercept = (images[0].slope, images[0].intercept) if as_stored else (1.0, 0.0)
    spacing = (plan.spacing[2], plan.spacing[1], plan.spacing[0])  # file axes: (col, row, slice)
    return DicomHeader("dicom", False, (cols, rows, plan.num_slices), dtype, spacing, plan.affine, slope, intercept,
                       rescale_declared=True, images=images, plan=plan, notes=notes + plan.notes)


def decode_series(header: DicomHeader, label: str) -> np.ndarray:
    """The chosen images' pixels on the planned grid: (slice, row, col), stored values or float32 HU."""
    as_stored = header.dtype.kind in "iu"  # one rescale, no resampling (see series_header)
    out = np.empty(_grid_shape(header), dtype=header.dtype if as_stored else np.float32)

    def store(k: int, image: DicomImage, pixels: np.ndarray) -> None:
        if as_stored:
            out[k] = pixels
        else:  # this slice's own rescale, in float64 as ITK computes it
            out[k] = pixels.astype(np.float64) * image.slope + image.intercept

    _decode_each(header, label, store)
    return out if as_stored else resample(out, header.plan)


def decode_series_hu(header: DicomHeader, label: str, flips: tuple[bool, bool, bool]) -> np.ndarray | None:
    """The series straight to float32 HU (clipped to the CT range) in canonical order, each slice converted and
    flipped by the decode thread that read it: no stored-value copy of the volume and no second pass over it (what
    a whole-volume read costs otherwise). `flips` (slice, row, col) from `orientation.canonical_flips`. None when
    the slices need resampling or differ in rescale (`decode_series` then)."""
    if header.dtype.kind not in "iu":
        return None
    out = np.empty(_grid_shape(header), dtype=np.float32)
    last = len(out) - 1
    in_plane = (slice(None, None, -1 if flips[1] else 1), slice(None, None, -1 if flips[2] else 1))

    def store(k: int, image: DicomImage, pixels: np.ndarray) -> None:
        rescaled_to_hu(pixels[in_plane], header.slope, header.intercept, out=out[last - k if flips[0] else k])

    _decode_each(header, label, store)
    return out


def _grid_shape(header: DicomHeader) -> tuple[int, int, int]:
    assert header.plan is not None
    return (len(header.plan.order), *header.images[header.plan.order[0]].geometry.shape)


def _decode_each(header: DicomHeader, label: str, store, indices: Iterable[int] | None = None) -> None:
    """Decode the chosen images at `indices` of `header.plan.order` (all by default) and hand each to
    `store(k, image, pixels)`, from two threads (in about the order given)."""
    ordered = [header.images[i] for i in header.plan.order]
    indices = range(len(ordered)) if indices is None else list(indices)
    shape = ordered[0].geometry.shape
    multi_frame: dict[str, np.ndarray] = {}

    def dataset_of(image: DicomImage) -> Dataset:
        return image.dataset if header.open_member is None else header.open_member(image.source)

    def decode(k: int) -> None:
        image = ordered[k]
        try:
            if image.frame is None:
                dataset = dataset_of(image)
                pixels = _native_pixels(dataset, shape, label, image.source)
                if pixels is None:
                    pixels = dataset.pixel_array
            else:  # one decode per multi-frame file (the threads of its frames wait for it)
                if image.source not in multi_frame:
                    multi_frame[image.source] = dataset_of(image).pixel_array.reshape(-1, *shape)
                pixels = multi_frame[image.source][image.frame]
        except CorruptDataError:
            raise
        except Exception as exc:  # truncated pixel data, a corrupt compressed stream, ...
            where = member_label(label, image.source)
            raise CorruptDataError(where, f"unreadable pixel data ({type(exc).__name__}: {_short(exc)})") from None
        if pixels.shape != shape:
            raise CorruptDataError(member_label(label, image.source),
                                   f"pixel data of shape {pixels.shape}, expected {shape}")
        store(k, image, pixels)

    if any(image.frame is not None for image in ordered):
        for k in indices:  # one multi-frame file: decoded once, frames copied
            decode(k)
    else:
        with ThreadPoolExecutor(min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
            list(pool.map(decode, indices))


def stream_grid(header: DicomHeader, label: str, emit: Callable[[int, np.ndarray], None],
                wanted: Iterable[int] | None = None) -> None:
    """Hand each wanted slice `g` of the planned grid (all by default) to `emit(g, plane)`, where `plane` equals
    `decode_series(header, label)[g]` (stored values, or float32 HU shifted and interpolated as `resample` does),
    decoding only the images those slices need and holding only the decoded slices still awaited (a few, as images
    are decoded in grid order). `emit` is called from one thread at a time, in about grid order."""
    plan = header.plan
    assert plan is not None
    as_stored = header.dtype.kind in "iu"  # then the plan is not resampled (see series_header)
    wanted = sorted(set(range(plan.num_slices) if wanted is None else wanted))

    def sources(g: int) -> tuple[int, ...]:
        if plan.lower is None:
            return (g,)
        below = int(plan.lower[g])
        return (below,) if plan.weight[g] == 0.0 else (below, below + 1)

    waiting = {g: sources(g) for g in wanted}
    users: dict[int, list[int]] = {}
    for g, needed in waiting.items():
        for k in needed:
            users.setdefault(k, []).append(g)
    decoded: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def store(k: int, image: DicomImage, pixels: np.ndarray) -> None:
        if as_stored:
            value = pixels
        else:  # as decode_series stores it (this slice's own rescale, in float64), then resample's in-plane shift
            value = np.empty(pixels.shape, np.float32)
            value[...] = pixels.astype(np.float64) * image.slope + image.intercept
            if plan.inplane_shift is not None:
                value = shifted(value, plan.inplane_shift[k])
        with lock:
            decoded[k] = value
            for g in list(users[k]):
                if g in waiting and all(source in decoded for source in waiting[g]):
                    emit(g, value if as_stored else grid_slice(plan, g, decoded.__getitem__))
                    for source in waiting.pop(g):
                        users[source].remove(g)
                        if not users[source]:
                            del decoded[source]

    _decode_each(header, label, store, sorted(users))


def _native_pixels(ds, shape: tuple[int, int], label: str, source: str) -> np.ndarray | None:
    """A single-frame, uncompressed little-endian slice straight from its bytes (pydicom's `pixel_array` costs
    ~1.5 ms a slice in checks and copies: most of a series' read). None: any other form, left to `pixel_array`.

    The unused high bits are cleared (or sign-extended) as pydicom does: shifted out and back in."""
    if ds.file_meta.get("TransferSyntaxUID") not in NATIVE_LITTLE_ENDIAN or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    allocated, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0) or 0)
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated:
        return None
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{allocated // 8}")
    data = ds.PixelData
    count = shape[0] * shape[1]
    if len(data) < count * dtype.itemsize:
        raise CorruptDataError(member_label(label, source), f"unreadable pixel data (truncated: {len(data):,} bytes "
                               f"for {shape[0]}x{shape[1]} pixels of {allocated} bits)")
    pixels = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    if stored < allocated:
        shift = allocated - stored
        pixels = np.right_shift(np.left_shift(pixels, shift), shift)
    return pixels


def _stored_dtype(ds, label: str) -> np.dtype:
    bits = int(ds.get("BitsAllocated", 16))
    if bits not in (8, 16, 32):
        raise UnsupportedFormatError(label, f"{bits}-bit pixels are not supported (8, 16 or 32)")
    return np.dtype(f"{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{bits // 8}")


def _check_decodable(syntax: str, label: str) -> None:
    uid = UID(syntax)
    if not syntax or not uid.is_transfer_syntax:
        raise UnsupportedFormatError(label, f"unknown transfer syntax {syntax or '(none)'!r}")
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise UnsupportedFormatError(label, f"pixel data compressed as {uid.name} ({syntax}): no decoder for it is "
                                            "installed")


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else ""
