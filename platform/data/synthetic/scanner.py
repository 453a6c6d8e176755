"""What the scanner makes of a drawn chest: reconstructions (kernel blur and noise in the 12-bit range), the
scan's geometry, and its DICOM metadata as CT-RATE's metadata CSV lists it.

Both reconstructions of a scan share everything but the kernel: reconstruction 1 is sharp, 2 soft.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctplatform.data.hounsfield import HU_MAX, HU_MIN
from ctplatform.data.hounsfield import RAW_RESCALE_INTERCEPT as RESCALE_INTERCEPT
from ctplatform.data.hounsfield import RAW_RESCALE_SLOPE as RESCALE_SLOPE
from ctplatform.data.synthetic.cohort import Volume
from ctplatform.data.synthetic.streams import META, NOISE, PATIENT, rng

_MISSING_ZSPACING_P = 0.05  # rows with an empty ZSpacing, as in CT-RATE


def _blur(vol: np.ndarray, weight: float) -> np.ndarray:
    """Separable in-plane [w, 1-2w, w] filter (edge-replicated): partial-volume blur / a soft kernel."""
    out = vol
    for axis in (0, 1):
        pad = np.concatenate([np.take(out, [0], axis), out, np.take(out, [-1], axis)], axis=axis)
        n = out.shape[axis]
        lo = np.take(pad, range(0, n), axis)
        mid = np.take(pad, range(1, n + 1), axis)
        hi = np.take(pad, range(2, n + 2), axis)
        out = (1 - 2 * weight) * mid + weight * (lo + hi)
    return out.astype(np.float32)


def reconstruct(clean: np.ndarray, seed: int, key: int, scan_index: int, recon: int) -> np.ndarray:
    """One reconstruction of a scan: blur (kernel) + noise, rounded and clipped to the 12-bit HU range."""
    noise = rng(seed, NOISE, key, scan_index, recon)
    if recon == 1:
        weight, sigma = noise.uniform(0.12, 0.22), noise.uniform(10, 30)
    else:  # a softer kernel: smoother, less noise
        weight, sigma = noise.uniform(0.25, 0.32), noise.uniform(8, 18)
    vol = _blur(clean, weight)
    vol += noise.standard_normal(vol.shape, dtype=np.float32) * np.float32(sigma)
    pad = clean <= HU_MIN  # the padding outside the reconstruction circle stays exact
    vol[pad] = HU_MIN
    return np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.float32)


def _num(x: float) -> str:
    """A number as DICOM-derived CSVs write it: integers without a decimal point."""
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


# maker, models, sharp kernels, soft kernels, exposure modulation
_SCANNERS = (
    ("Philips", ("iCT 256", "Brilliance 64", "Ingenuity CT"), ("YA", "YB", "L"), ("B", "C"), "Z DOM"),
    ("SIEMENS", ("SOMATOM Definition Edge", "SOMATOM go.Up"), ("Br64", "I70f"), ("Br40", "I30f"), "XYZ_EC"),
    ("GE MEDICAL SYSTEMS", ("Revolution EVO", "Optima CT660"), ("LUNG", "BONE"), ("STANDARD", "SOFT"), "SmartmA"),
    ("TOSHIBA", ("Aquilion ONE", "Aquilion Prime"), ("FC52", "FC86"), ("FC13", "FC18"), "NONE"),
)


@dataclass(frozen=True)
class Geometry:
    """Where a scan's voxels are: field of view (mm), in-plane and slice spacing (mm), first slice's position."""

    fov: int
    xy: float
    zsp: float
    ipp: tuple[float, float, float]

    def affine(self) -> np.ndarray:
        """Voxel (x=col, y=row, z=slice) -> RAS mm, as a DICOM (LPS) conversion writes it."""
        aff = np.diag([-self.xy, -self.xy, self.zsp, 1.0])
        aff[:3, 3] = (-self.ipp[0], -self.ipp[1], self.ipp[2])
        return aff


def scan_metadata(seed: int, vol: Volume, size: tuple[int, int, int]) -> tuple[Geometry, dict]:
    """The geometry and metadata CSV row (column -> text, all but VolumeName) of volume `vol`: both
    reconstructions of a scan share everything but the kernel."""
    rows, cols, slices = size
    prng = rng(seed, PATIENT, vol.key)
    sex = "M" if prng.random() < 0.55 else "F"
    age = int(prng.integers(22, 90))
    r = rng(seed, META, vol.key, vol.scan_index)
    maker, models, sharp, soft, modulation = _SCANNERS[int(r.choice(len(_SCANNERS), p=(0.55, 0.3, 0.1, 0.05)))]
    fov = int(r.integers(300, 481))
    xy = fov / cols
    length = r.uniform(260, 360)
    zsp = max(0.125, round(length / slices / 0.125) * 0.125)
    ipp = (round(-fov / 2 + r.uniform(-20, 20), 1), round(-fov / 2 + r.uniform(-30, 60), 1),
           round(r.uniform(-350, 60), 4))
    ctdi = r.uniform(3, 14)
    kv_ma = int(r.integers(60, 400))
    exposure_time = int(r.integers(300, 1000))
    year, month, day = int(r.integers(2018, 2022)), int(r.integers(1, 13)), int(r.integers(1, 29))
    philips = maker == "Philips"
    no_z = r.random() < _MISSING_ZSPACING_P
    kernel = (sharp if vol.recon == 1 else soft)[int(r.integers(0, 2))]
    row = {
        "Manufacturer": maker,
        "SeriesDescription": str(r.choice(["HRCT", "THORAX", "CHEST W/O", "AKCIGER", "TORAKS HRCT"])),
        "ManufacturerModelName": str(r.choice(models)),
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "ReconstructionDiameter": str(fov),
        "DistanceSourceToDetector": "" if philips else "1085.6",
        "DistanceSourceToPatient": "" if philips else "595",
        "GantryDetectorTilt": "0",
        "TableHeight": str(int(r.integers(70, 190))),
        "RotationDirection": "CW",
        "ExposureTime": str(exposure_time),
        "XRayTubeCurrent": str(kv_ma),
        "Exposure": str(int(kv_ma * exposure_time / 1000)),
        "FilterType": "YA" if philips else str(r.choice(["FLAT", "BODY FILTER", "LARGE"])),
        "GeneratorPower": "" if philips else str(int(r.integers(10, 60))),
        "FocalSpots": "" if philips else "1.2",
        "ConvolutionKernel": kernel,
        "PatientPosition": "HFS" if r.random() < 0.9 else "FFS",
        "RevolutionTime": "" if philips else "0.5",
        "SingleCollimationWidth": "" if philips else "0.625",
        "TotalCollimationWidth": "" if philips else "40",
        "TableSpeed": "" if philips else "78.75",
        "TableFeedPerRotation": "" if philips else "39.375",
        "SpiralPitchFactor": "" if philips else "0.984375",
        "DataCollectionCenterPatient": "" if philips else f"[0, {_num(ipp[1] + fov / 2)}, {_num(ipp[2])}]",
        "ReconstructionTargetCenterPatient": "" if philips else f"[0, {_num(ipp[1] + fov / 2)}, {_num(ipp[2])}]",
        "ExposureModulationType": modulation,
        "CTDIvol": _num(round(ctdi, 9)),
        "ImagePositionPatient": f"[{_num(ipp[0])}, {_num(ipp[1])}, {_num(ipp[2])}]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "SliceLocation": _num(ipp[2]),
        "SamplesPerPixel": "1",
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": str(rows),
        "Columns": str(cols),
        "XYSpacing": f"[{_num(xy)}, {_num(xy)}]",
        "RescaleIntercept": _num(RESCALE_INTERCEPT),
        "RescaleSlope": _num(RESCALE_SLOPE),
        "RescaleType": "" if philips else "HU",
        "NumberofSlices": str(slices),
        "ZSpacing": "" if no_z else _num(zsp),
        "StudyDate": f"{year:04d}{month:02d}{day:02d}",
    }
    return Geometry(fov, xy, zsp, ipp), row
