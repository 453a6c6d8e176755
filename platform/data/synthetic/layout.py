"""Writing the synthetic data set in CT-RATE's folder layout, with the quirks of CT-RATE's files::

    dataset/{train,valid}/{split}_{p}/{split}_{p}_{scan}/{split}_{p}_{scan}_{recon}.nii.gz   original style
    dataset/{train,valid}_fixed/...                                                           `_fixed` style
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    dataset/metadata/{train,validation}_metadata.csv

Original volumes hold float raw values (HU + 1024) with a blank header scaling and the rescale only in the
metadata CSV; `_fixed` volumes hold int16 with scl_slope/scl_inter in the header while the CSV *still* lists
RescaleIntercept -1024 (applying it again shifts everything by -1024). gzip streams carry mtime 0, so the same
volumes give the same bytes, and every file is written atomically.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from ctplatform.data.hounsfield import RAW_RESCALE_INTERCEPT as RESCALE_INTERCEPT
from ctplatform.data.hounsfield import RAW_RESCALE_SLOPE as RESCALE_SLOPE
from ctplatform.data.synthetic.cohort import Volume
from ctplatform.data.synthetic.scanner import Geometry
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN

METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
)
LABELS_DIR = "multi_abnormality_labels"
METADATA_DIR = "metadata"
METADATA_FILES = {"train": "train_metadata.csv", "valid": "validation_metadata.csv"}
_TREES = ("train", "valid", "train_fixed", "valid_fixed")  # where volumes live


def volume_relpath(vol: Volume) -> Path:
    """Where volume `vol` lives under ``dataset/``."""
    tree = vol.split + ("_fixed" if vol.fixed else "")
    patient = f"{vol.split}_{vol.patient}"
    return Path(tree, patient, f"{patient}_{vol.scan}", vol.name)


def _nifti_bytes(hu: np.ndarray, fixed: bool, affine: np.ndarray, spacing: tuple[float, float, float],
                 nan_affine: bool) -> bytes:
    """A single-file NIfTI-1 image of `hu` (rows, cols, slices), stored as voxel axes (x=cols, y=rows, z)."""
    data = np.transpose(hu, (1, 0, 2))
    raw = data - RESCALE_INTERCEPT  # what the scanner stores: HU + 1024
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16 if fixed else np.float32)
    hdr.set_data_shape(data.shape)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_zooms(spacing)
    if nan_affine:
        hdr.set_qform(None, code=0)
        for row in ("srow_x", "srow_y", "srow_z"):
            hdr[row] = np.nan
        hdr["sform_code"] = 1
    else:
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
    if fixed:
        hdr["scl_slope"], hdr["scl_inter"] = RESCALE_SLOPE, RESCALE_INTERCEPT
        array = np.rint(raw).astype("<i2")
    else:
        hdr["scl_slope"], hdr["scl_inter"] = np.nan, np.nan
        array = raw.astype("<f4")
    hdr.set_data_offset(352)
    assert hdr.endianness == "<"
    buf = io.BytesIO()
    buf.write(hdr.binaryblock)
    buf.write(b"\x00\x00\x00\x00")  # no extensions
    buf.write(array.tobytes(order="F"))
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _csv_bytes(header, rows) -> bytes:
    """A UTF-8 CSV with `\\n` line ends."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def write_volume(root: Path, vol: Volume, hu: np.ndarray, geometry: Geometry, nan_affine: bool) -> Path:
    """Write volume `vol` (`hu`: rows, cols, slices) under `root` (``dataset/``) in its tree's style; its path."""
    payload = _nifti_bytes(hu, vol.fixed, geometry.affine(), (geometry.xy, geometry.xy, geometry.zsp),
                           nan_affine=nan_affine)
    path = root / volume_relpath(vol)
    _write_atomic(path, gzip.compress(payload, compresslevel=6, mtime=0))
    return path


def write_tables(root: Path, volumes: Iterable[tuple[Volume, Mapping[str, str]]]
                 ) -> tuple[dict[str, Path], dict[str, Path]]:
    """Write the labels and metadata CSVs of each split, a row per (volume, metadata row) in the given order;
    returns their paths per split ("train", "valid")."""
    label_rows: dict[str, list] = {"train": [], "valid": []}
    meta_rows: dict[str, list] = {"train": [], "valid": []}
    for vol, meta in volumes:
        label_rows[vol.split].append([vol.name, *vol.labels])
        meta_rows[vol.split].append([vol.name, *(meta[col] for col in METADATA_COLUMNS[1:])])
    labels_csv, metadata_csv = {}, {}
    for split in ("train", "valid"):
        labels_csv[split] = root / LABELS_DIR / f"{split}_predicted_labels.csv"
        _write_atomic(labels_csv[split], _csv_bytes((VOLUME_COLUMN, *CLASS_NAMES), label_rows[split]))
        metadata_csv[split] = root / METADATA_DIR / METADATA_FILES[split]
        _write_atomic(metadata_csv[split], _csv_bytes(METADATA_COLUMNS, meta_rows[split]))
    return labels_csv, metadata_csv


def stale_volumes(root: Path, expected: set[Path]) -> list[Path]:
    """Volume files under `root`'s trees other than `expected` (paths relative to `root`)."""
    stale = []
    for tree in _TREES:
        base = root / tree
        if base.is_dir():
            stale += [p for p in sorted(base.rglob("*.nii.gz")) if p.relative_to(root) not in expected]
    return stale
