"""How much memory decoding and preparing one volume holds at its peak, reckoned from its header before any image data
is read: what the HTTP service reserves in its decode budget (`ctplatform.serve.body.MemoryBudget`) per request.

The figure follows the path `preprocess_stream.open_for_preprocessing` will take (tests check it stays above the
traced peak of that path, and within a small factor of it):
- streamed (a NIfTI or MetaImage volume that needs only flips, a zipped DICOM series): a few planes, the resize
  batch, the coarse sample of every slice and the chosen slices at model size; a zip adds each member's parsed
  header and the members being decoded;
- held whole (a non-axial volume, an Enhanced CT file, a series that is resampled whole): the stored volume as read,
  plus the HU of the chosen slices; an Enhanced CT file also its parsed copy and the decoded frames in float32.
It counts neither the upload itself (the body budget holds it) nor the interpreter and libraries.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.preprocess_stream import CHECK_STEP, RESIZE_BATCH, RESIZE_BATCH_BYTES, streams_series
from ctplatform.data.readers.base import ReadLimits
from ctplatform.data.readers.chain import HEAD_BYTES, VolumeSource, opened, read_header
from ctplatform.data.readers.dicom import DECODE_THREADS, is_dicom_file
from ctplatform.data.readers.dicom_geometry import LPS_TO_RAS
from ctplatform.data.readers.dicom_zip import MemberFile, is_zip, open_archive
from ctplatform.data.readers.orientation import canonical_flips

FLOAT32 = 4
FLOOR_BYTES = 8 << 20  # what any decode holds (buffers, small arrays); also the figure for an unreadable header
MEMBER_HEADER_BYTES = 48 << 10  # a parsed DICOM header (pydicom objects), measured at ~20-30 KiB
HELD_COPIES = 2  # a whole read: the inflated bytes and, transiently, the stream's own chunks of them
# An Enhanced CT file: its parsed copy, the decoded frames, those in float32 (twice int16) and resampled, the HU of
# the chosen slices.
ENHANCED_COPIES = 8


def decode_estimate(source: VolumeSource, name: str, settings: PreprocessSettings,
                    limits: ReadLimits | None = None) -> int:
    """Upper estimate of the bytes decoding and preparing the upload at `source` (named `name`: its bytes, or a
    :class:`~ctplatform.data.readers.file_range.FileRange` of a spooled body) holds at its peak. Never raises: an
    upload whose header cannot be read gets FLOOR_BYTES (its decode is refused within them)."""
    try:
        with opened(source, name) as (stream, label):
            head = stream.read(HEAD_BYTES)
            size = stream.seek(0, 2)
            stream.seek(0)
            if is_zip(head):
                return _zip_estimate(stream, label, settings, limits or ReadLimits())
            if is_dicom_file(head):
                return FLOOR_BYTES + ENHANCED_COPIES * size + _chosen_bytes(settings, 0, 0, held=True)
            header = read_header(stream, name=label)
    except Exception:  # the decode reports what is wrong; the estimate only needs to be safe
        return FLOOR_BYTES
    dims = [int(d) for d in header.shape[:3]] + [1] * (3 - len(header.shape[:3]))
    cols, rows, slices = dims
    if min(dims) < 1:
        return FLOOR_BYTES
    plane = rows * cols * FLOAT32
    if canonical_flips(header.affine) is None:  # held whole (to_canonical may swap axes)
        return FLOOR_BYTES + HELD_COPIES * header.nbytes + _sample_bytes(slices, rows, cols) \
            + _chosen_bytes(settings, slices, plane, held=True)
    return FLOOR_BYTES + 3 * plane + rows * cols * header.itemsize + _sample_bytes(slices, rows, cols) \
        + _chosen_bytes(settings, slices, plane, held=False)


def _zip_estimate(stream: BinaryIO, name: str, settings: PreprocessSettings, limits: ReadLimits) -> int:
    members = open_archive(stream, name, limits.max_series_files, limits.max_series_bytes)
    if not members:
        return FLOOR_BYTES
    largest = max(member.info.file_size for member in members)  # a slice's stored pixels and its header
    side = math.isqrt(max(1, largest // 2))  # rows x cols of int16 pixels, taken square (the resize pads to it)
    plane = side * side * FLOAT32
    slices = len(members)
    headers = slices * MEMBER_HEADER_BYTES
    if not _streamed_series(members):  # held whole: the grid in float32, resampled once more
        return FLOOR_BYTES + headers + 2 * slices * plane + _sample_bytes(slices, side, side) \
            + _chosen_bytes(settings, slices, plane, held=True)
    # each decode thread: the member's inflated bytes, its parsed pixel data, the pixels and their float64 rescale
    decoding = DECODE_THREADS * (2 * largest + 3 * plane)
    return (FLOOR_BYTES + headers + decoding + 3 * plane + _sample_bytes(slices, side, side)
            + _chosen_bytes(settings, slices, plane, held=False))


def _streamed_series(members: list[MemberFile]) -> bool:
    """Whether the series is scanned member by member, decided as the decode decides (`streams_series`) from its
    first DICOM member's frames and orientation (the series' affine has the same axes: rows, columns, their normal)."""
    for member in members:
        try:
            ds = pydicom.dcmread(member, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM (a readme): skipped by the reader too
        finally:
            member.release()
        orientation = np.array([float(v) for v in ds.get("ImageOrientationPatient", [])] or [0.0] * 6)
        if orientation.shape != (6,):
            return False
        affine = np.eye(4)  # LPS (DICOM) -> RAS, as the series' affine
        affine[:3, :3] = LPS_TO_RAS @ np.column_stack(
            [orientation[:3], orientation[3:], np.cross(orientation[:3], orientation[3:])])
        return streams_series(affine, int(ds.get("NumberOfFrames", 1) or 1) == 1)
    return False


def _sample_bytes(slices: int, rows: int, cols: int) -> int:
    """The coarse sample of every slice (1/64 of a side), once listed and once stacked, and the checks' (1/4)."""
    step = max(1, min(rows, cols) // 64)
    coarse = slices * math.ceil(rows / step) * math.ceil(cols / step) * FLOAT32
    checked = math.ceil(rows / CHECK_STEP) * math.ceil(cols / CHECK_STEP) * FLOAT32
    return 2 * coarse + 4 * checked


def _chosen_bytes(settings: PreprocessSettings, slices: int, plane: int, held: bool) -> int:
    """The chosen slices: full planes in float32 (its stack and the square padding too), a resize batch of them
    streamed or all of them held, and all of them at the model's size (float32 while resized, then int16)."""
    count = settings.num_slices if settings.selection == "even" else math.ceil(max(slices, 1) / settings.stride)
    at_once = count if held else max(1, min(RESIZE_BATCH, RESIZE_BATCH_BYTES // max(plane, 1)))
    return 3 * at_once * plane + count * settings.image_size ** 2 * (3 * FLOAT32 + 2)
