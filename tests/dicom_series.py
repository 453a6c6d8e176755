"""Write DICOM CT series with pydicom for the tests: from an HU array, with the traps real exports have.

Standard axial orientation (ImageOrientationPatient 1,0,0,0,1,0); slice k of `hu` (slices, rows, cols, inferior
first) lies at ImagePositionPatient origin + (0, k * tilt_mm, z[k]). Stored values are (HU - intercept) / slope.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PATIENT = {"PatientName": "Zyxwvut^Qwertyuiop", "PatientID": "PID-98765-SECRET", "PatientBirthDate": "19410723",
           "AccessionNumber": "ACC-55555-SECRET"}


def _base(sop_class, series_uid, study_uid, modality, description, patient) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.SeriesDescription = description
    for key, value in (patient or PATIENT).items():
        setattr(ds, key, value)
    return ds


def stored_values(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return np.round((np.asarray(hu, np.float64) - intercept) / slope).astype(np.int16)


def write_series(folder, hu, *, spacing=(2.0, 0.75, 0.75), z=None, origin=(-100.0, -120.0, -300.0), slope=1.0,
                 intercept=-1024.0, rescales=None, syntax=ExplicitVRLittleEndian, series_uid=None, study_uid=None,
                 modality="CT", seed=0, tilt_mm=0.0, description="CHEST 2.0", image_type=("ORIGINAL", "PRIMARY",
                 "AXIAL"), patient=None, compress=None) -> list[Path]:
    """One file per slice, random names, written in shuffled order. `rescales` gives each slice (slope, intercept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    z = np.asarray(z if z is not None else origin[2] + spacing[0] * np.arange(len(hu)), dtype=np.float64)
    rescales = rescales or [(slope, intercept)] * len(hu)
    order = list(range(len(hu)))
    rng.shuffle(order)
    paths = []
    for k in order:
        ds = _base(CTImageStorage, series_uid, study_uid, modality, description, patient)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        ds.ImageType = list(image_type)
        ds.InstanceNumber = rng.randint(1, 10_000)  # meaningless on purpose: order comes from positions
        ds.ImagePositionPatient = [origin[0], origin[1] + k * tilt_mm, float(z[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleSlope, ds.RescaleIntercept = rescales[k]
        ds.set_pixel_data(stored_values(hu[k], *rescales[k]), "MONOCHROME2", 16)
        if compress is not None:
            ds.compress(compress)
        path = folder / f"{rng.getrandbits(48):012x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_scout(folder, shape=(64, 48), series_uid=None, study_uid=None) -> Path:
    """A localizer (coronal projection) in the same series, as scanners export it."""
    ds = _base(CTImageStorage, series_uid or generate_uid(), study_uid or generate_uid(), "CT", "TOPOGRAM", None)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImagePositionPatient = [-250.0, 0.0, 100.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [1.0, 1.0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.set_pixel_data(np.full(shape, 1000, np.int16), "MONOCHROME2", 16)
    path = Path(folder) / "zz_scout.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced(path, hu, *, spacing=(2.0, 0.75, 0.75), origin=(-100.0, -120.0, -300.0), rescales=None,
                   seed=0) -> Path:
    """One Enhanced CT multi-frame file; frames stored in shuffled order, each with its own position and rescale."""
    rng = random.Random(seed)
    rescales = rescales or [(1.0, -1024.0)] * len(hu)
    order = list(range(len(hu)))
    rng.shuffle(order)
    ds = _base(EnhancedCTImageStorage, generate_uid(), generate_uid(), "CT", "CHEST MF", None)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [spacing[1], spacing[2]]
    measures.SliceThickness = spacing[0]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for k in order:
        group, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        transform.RescaleSlope, transform.RescaleIntercept = rescales[k]
        transform.RescaleType = "HU"
        group.PlanePositionSequence = [position]
        group.PixelValueTransformationSequence = [transform]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.set_pixel_data(np.stack([stored_values(hu[k], *rescales[k]) for k in order]), "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
