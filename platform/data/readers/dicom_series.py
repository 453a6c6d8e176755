"""Which 2-D images of a DICOM folder or archive make the CT volume: parsing, localizers, modality, series choice.

Every file is parsed (large values such as pixel data deferred); files that are not DICOM are skipped, and so are
DICOM objects without an image (DICOMDIR, reports). Each image frame becomes a :class:`DicomImage` with its own
position, orientation, spacing and rescale: single-frame CT files give one, Enhanced CT multi-frame files one per
frame (from their per-frame and shared functional groups).

The rules (README, "DICOM series"):
- localizers/scouts (`ImageType` holding LOCALIZER) are dropped;
- only `Modality` CT is read: if no CT series is present the read is refused, naming the modality found;
- several CT series: images of different studies are refused; otherwise the series with the most slices is read
  and the others are listed in the volume's notes; a tie is refused with a message listing the series.
Series are named by the last 8 characters of their SeriesInstanceUID, their SeriesDescription and slice count:
never by a patient attribute (names, IDs, dates and accession numbers are never read into a message).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from ctplatform.data.errors import CorruptDataError, DataFormatError, UnsupportedFormatError, UnusableContentError
from ctplatform.data.readers.dicom_geometry import SliceGeometry

# pydicom's value validation warns with the offending value, which may be a patient's name or birth date: the
# reader never validates values it does not use, so nothing identifying reaches a log.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
DEFER_BYTES = 16 * 1024  # values above this (pixel data) are read from the file only when decoded
PARSE_THREADS = 2  # parsing holds the GIL: more threads only contend (benchmarks/dicom_read.py); 2 overlap file reads
LOCALIZER = "LOCALIZER"
MAX_LISTED = 6  # series named in a message (one line, however many a folder holds)
CT_IMAGE_CLASSES = {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}

MemberSource = Path | bytes | BinaryIO  # a file, a file's bytes, or a file object (a zip member)


@dataclass
class DicomImage:
    """One 2-D image (a file, or one frame of a multi-frame file)."""

    source: str  # the member's name inside the folder or archive, for messages
    dataset: Dataset
    frame: int | None  # frame index in a multi-frame file; None for a single-frame file
    geometry: SliceGeometry
    slope: float
    intercept: float


def member_label(label: str, name: str) -> str:
    """How a message names one file of a series: `series.zip/IM0001`; a lone file (name "") by its own label."""
    return f"{label}/{name}" if name else label


def parse_members(members: Sequence[tuple[str, MemberSource]], label: str) -> list[tuple[str, Dataset]]:
    """(name, dataset) of every member that is a DICOM file, in the members' order; pixel data is deferred."""

    def parse(member: tuple[str, MemberSource]) -> tuple[str, Dataset | None]:
        name, source = member
        try:
            handle = io.BytesIO(source) if isinstance(source, bytes) else \
                str(source) if isinstance(source, Path) else source
            return name, pydicom.dcmread(handle, defer_size=DEFER_BYTES)
        except InvalidDicomError:
            return name, None  # no DICM prefix: not a DICOM file (a readme, a .DS_Store), skipped
        except DataFormatError:
            raise  # a zip member refused as it was opened (a nested archive, a corrupt stream)
        except OSError as exc:
            raise CorruptDataError(member_label(label, name), f"unreadable file ({type(exc).__name__})") from None
        except Exception as exc:  # pydicom raises many types for a malformed file; its messages may quote values
            raise CorruptDataError(member_label(label, name),
                                   f"truncated or malformed DICOM file ({type(exc).__name__})") from None

    threads = min(PARSE_THREADS, os.cpu_count() or 1, max(1, len(members)))
    with ThreadPoolExecutor(threads) as pool:
        parsed = list(pool.map(parse, members))
    return [(name, ds) for name, ds in parsed if ds is not None]


def images_of(datasets: list[tuple[str, Dataset]], label: str) -> tuple[list[DicomImage], list[str]]:
    """The CT images of the one series to read, and notes on what was left out (see the module's rules)."""
    if not datasets:
        raise UnsupportedFormatError(label, "no DICOM file found (a series folder or .zip of .dcm files, a NIfTI "
                                            "or a MetaImage file is expected)")
    with_pixels = [(n, ds) for n, ds in datasets if "PixelData" in ds]
    for name, ds in datasets:
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if "PixelData" not in ds and sop_class in CT_IMAGE_CLASSES:  # never a silent gap in the volume
            raise CorruptDataError(member_label(label, name), "a CT image without pixel data (truncated file?)")
    if not with_pixels:
        raise UnusableContentError(label, "the DICOM files hold no pixel data (no image)")
    notes = []
    scouts = [n for n, ds in with_pixels if LOCALIZER in _image_type(ds)]
    if scouts:
        notes.append(f"{len(scouts)} localizer (scout) image(s) left out")
    images = [(n, ds) for n, ds in with_pixels if LOCALIZER not in _image_type(ds)]
    if not images:
        raise UnusableContentError(label, "the DICOM files hold only localizer (scout) images, no CT volume")
    ct = [(n, ds) for n, ds in images if str(ds.get("Modality", "")).upper() == "CT"]
    if not ct:
        found = sorted({str(ds.get("Modality", "")) or "none" for _, ds in images})
        raise UnusableContentError(label, f"modality {', '.join(found)}: only CT series are read")
    if len(ct) < len(images):
        notes.append(f"{len(images) - len(ct)} non-CT image(s) left out")
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for name, ds in ct:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((name, ds))
    chosen = _choose_series(series, label, notes)
    return [image for name, ds in chosen for image in _frames(name, ds, label)], notes


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType", [])
    return [str(v).upper() for v in (value if isinstance(value, list | tuple | pydicom.multival.MultiValue)
                                     else [value])]


def _choose_series(series: dict[str, list[tuple[str, Dataset]]], label: str, notes: list[str]):
    if len(series) == 1:
        return next(iter(series.values()))
    counts = {uid: sum(_frame_count(ds) for _, ds in files) for uid, files in series.items()}
    ranked_series = sorted(series.items(), key=lambda kv: -counts[kv[0]])
    listing = "; ".join(_describe(uid, files[0][1], counts[uid]) for uid, files in ranked_series[:MAX_LISTED])
    if len(series) > MAX_LISTED:
        listing += f"; and {len(series) - MAX_LISTED} more"
    studies = {str(files[0][1].get("StudyInstanceUID", "")) for files in series.values()}
    if len(studies) > 1:
        raise UnusableContentError(label, f"images of {len(studies)} different studies: give one series "
                                          f"({listing})")
    ranked = sorted(series, key=lambda uid: -counts[uid])
    if counts[ranked[0]] == counts[ranked[1]]:
        raise UnusableContentError(label, f"{len(series)} CT series with no single longest one: give one series "
                                          f"({listing})")
    notes.append(f"{len(series)} CT series found: read the one with the most slices ({listing})")
    return series[ranked[0]]


def _describe(uid: str, ds: Dataset, count: int) -> str:
    description = "".join(ch for ch in str(ds.get("SeriesDescription", "")) if ch.isprintable())[:40]
    return f"series ...{uid[-8:]} {description!r} with {count} slice(s)"


def _frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _frames(name: str, ds: Dataset, label: str) -> list[DicomImage]:
    where = member_label(label, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not photometric.startswith("MONOCHROME"):
        raise UnusableContentError(where, "not a grey-scale image (SamplesPerPixel / PhotometricInterpretation)")
    frames = _frame_count(ds)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        geometry = _geometry(ds, ds, ds, where)
        slope, intercept = _rescale(ds, where)
        return [DicomImage(name, ds, None, geometry, slope, intercept)]
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise UnusableContentError(where, "a multi-frame image without per-frame positions (no "
                                          "PerFrameFunctionalGroupsSequence for each frame)")
    images = []
    for index, group in enumerate(per_frame):
        def item(sequence: str, group=group):
            return _first(group.get(sequence)) or _first(shared.get(sequence) if shared is not None else None)

        geometry = _geometry(item("PlanePositionSequence"), item("PlaneOrientationSequence"),
                             item("PixelMeasuresSequence"), where, ds)
        transform = item("PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, where)
        images.append(DicomImage(name, ds, index, geometry, slope, intercept))
    return images


def _first(sequence):
    return sequence[0] if sequence else None


def _geometry(position_ds, orientation_ds, measures_ds, where: str, image_ds: Dataset | None = None) -> SliceGeometry:
    image_ds = image_ds if image_ds is not None else position_ds
    try:
        position = np.array([float(v) for v in position_ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in orientation_ds.ImageOrientationPatient], dtype=np.float64)
        spacing = tuple(float(v) for v in measures_ds.PixelSpacing)
        shape = (int(image_ds.Rows), int(image_ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise UnusableContentError(where, "no usable ImagePositionPatient, ImageOrientationPatient, PixelSpacing, "
                                          "Rows and Columns: the slice's place in the volume is unknown") from None
    if position.shape != (3,) or orientation.shape != (6,) or len(spacing) != 2 or min(spacing) <= 0 \
            or not np.isfinite(position).all() or not np.isfinite(orientation).all():
        raise UnusableContentError(where, "malformed ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    return SliceGeometry(position, orientation, (spacing[0], spacing[1]), shape)


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    try:
        slope, intercept = (float(v) if (v := ds.get(key)) not in (None, "") else default
                            for key, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)))
    except (TypeError, ValueError):
        raise UnusableContentError(where, "malformed RescaleSlope or RescaleIntercept") from None
    if not np.isfinite([slope, intercept]).all() or slope == 0:
        raise UnusableContentError(where, "RescaleSlope must be finite and non-zero")
    return slope, intercept
