"""Deterministic synthetic CT-RATE: the same tree, CSVs and file quirks, with volumes small enough for a laptop.

The platform must run and be tested offline, so this module writes a data set shaped like a CT-RATE download
(DESIGN.md §3)::

    dataset/{train,valid}/{split}_{p}/{split}_{p}_{scan}/{split}_{p}_{scan}_{recon}.nii.gz   original style
    dataset/{train,valid}_fixed/...                                                           `_fixed` style
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    dataset/metadata/{train,validation}_metadata.csv

with the traps of the real files: original volumes hold float raw values (HU + 1024) with a blank header scaling
and the rescale only in the metadata CSV; `_fixed` volumes hold int16 with scl_slope/scl_inter in the header
while the CSV *still* lists RescaleIntercept -1024 (applying it again shifts everything by -1024); one train
volume has an all-NaN affine; ~5% of rows have no ZSpacing; both reconstructions of a scan share one label row.

Volumes are drawn from a simple chest phantom in plausible Hounsfield units (body, fat, muscle, lungs with vessels
and airways, heart, aorta, trachea, spine, ribs) with large nuisance variation between healthy volumes (body and
lung size, fat, noise, smoothing, bone density, dense bone spots, contrast). Each of the 18 findings is local and
placed where it occurs in real scans, spanning a contiguous range of slices, so a slice classifier can learn it
while global intensity statistics (a histogram) reveal little: the realism check in ``tests/test_synthetic.py``.

Everything is numpy and deterministic: each patient's content comes from a ``numpy.random.Generator`` seeded by
(seed, patient), gzip streams carry mtime 0, and files are written atomically.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE, VOLUME_COLUMN

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
RESCALE_SLOPE, RESCALE_INTERCEPT = 1.0, -1024.0
HU_MIN, HU_MAX = -1024, 3071  # 12-bit CT range; raw values (HU + 1024) are 0..4095
MIN_SIZE = (16, 16, 8)

# Random streams: every draw comes from default_rng([seed, stream, patient, ...]).
_STRUCTURE, _LABELS, _ANATOMY, _NOISE, _META, _PATIENT = range(6)
_SECOND_SCAN_P = 0.15  # patients with a scan 'b'
_SECOND_RECON_P = 1 / 3  # scans with a second reconstruction
_MISSING_ZSPACING_P = 0.05


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_dataset` wrote. Volume names include `.nii.gz`, as in the CSVs."""

    out_dir: Path
    dataset_dir: Path
    size: tuple[int, int, int]  # (rows, cols, slices)
    seed: int
    num_volumes: int
    num_train_volumes: int
    num_valid_volumes: int
    num_train_patients: int
    num_valid_patients: int
    num_fixed_volumes: int
    labels_csv: Mapping[str, Path]  # split ("train", "valid") -> path
    metadata_csv: Mapping[str, Path]
    volume_paths: Mapping[str, Path] = field(repr=False)  # volume name -> file
    # volume name -> {finding: (first, last) slice index along the file's z axis, inclusive}; not written to disk
    finding_slices: Mapping[str, Mapping[str, tuple[int, int]]] = field(repr=False)
    fixed_volumes: tuple[str, ...] = field(repr=False)  # names stored in the `_fixed` trees
    nan_affine_volume: str | None = None  # the train volume whose affine is all NaN


def parse_size(text: str) -> tuple[int, int, int]:
    """Parse ``"ROWSxCOLSxSLICES"`` (e.g. ``"64x64x48"``) into a tuple of three ints."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"size must look like ROWSxCOLSxSLICES, e.g. 64x64x48; got {text!r}")
    size = tuple(int(g) for g in match.groups())
    _check_size(size)
    return size  # type: ignore[return-value]


def _check_size(size: tuple[int, ...]) -> tuple[int, int, int]:
    if len(size) != 3 or any(int(s) != s for s in size):
        raise ValueError(f"size must be three ints (rows, cols, slices); got {size!r}")
    if any(s < m for s, m in zip(size, MIN_SIZE, strict=True)) or any(s > 1024 for s in size):
        raise ValueError(f"size {size} outside {MIN_SIZE}..(1024, 1024, 1024) (rows, cols, slices)")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ structure
@dataclass(frozen=True)
class _Volume:
    split: str  # "train" | "valid"
    patient: int  # 1-based number within the split
    key: int  # global patient index: the random streams' key
    scan: str  # "a", "b"
    scan_index: int
    recon: int  # 1, 2
    fixed: bool
    labels: tuple[int, ...]

    @property
    def stem(self) -> str:
        return f"{self.split}_{self.patient}_{self.scan}_{self.recon}"

    @property
    def name(self) -> str:
        return self.stem + ".nii.gz"

    def relpath(self) -> Path:
        tree = self.split + ("_fixed" if self.fixed else "")
        patient = f"{self.split}_{self.patient}"
        return Path(tree, patient, f"{patient}_{self.scan}", self.name)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *key])


def _bresenham(index: int, fraction: float) -> bool:
    """True for about `fraction` of consecutive indices, evenly spread; a prefix keeps its choices."""
    return math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


def _plan(num_volumes: int, seed: int, valid_fraction: float, fixed_fraction: float) -> list[_Volume]:
    """Patients, scans and reconstructions. Patient k's content depends only on (seed, k)."""
    cap = max(1, num_volumes // 3)  # at least 3 patients even for tiny data sets
    patients: list[list[tuple[str, int, int]]] = []
    total = 0
    while total < num_volumes:
        rng = _rng(seed, _STRUCTURE, len(patients))
        n_scans = 2 if rng.random() < _SECOND_SCAN_P else 1
        items = []
        for s in range(n_scans):
            n_recons = 2 if rng.random() < _SECOND_RECON_P else 1
            items += [("ab"[s], s, r) for r in range(1, n_recons + 1)]
        items = items[: min(cap, num_volumes - total)]
        patients.append(items)
        total += len(items)
    splits = ["valid" if _bresenham(k, valid_fraction) else "train" for k in range(len(patients))]
    for k in range(len(patients) - 1, -1, -1):  # at least 2 validation patients, at least 1 train patient
        if splits.count("valid") >= min(2, len(patients) - 1):
            break
        splits[k] = "valid"
    if "train" not in splits:
        splits[0] = "train"
    volumes: list[_Volume] = []
    counters = {"train": 0, "valid": 0}
    prevalence = np.array([VALID_PREVALENCE[c] for c in CLASS_NAMES])
    for k, items in enumerate(patients):
        split = splits[k]
        number = counters[split]
        counters[split] += 1
        fixed = _bresenham(number, fixed_fraction)
        labels = tuple(int(x) for x in _rng(seed, _LABELS, k).random(len(CLASS_NAMES)) < prevalence)
        volumes += [_Volume(split, number + 1, k, scan, s, recon, fixed, labels) for scan, s, recon in items]
    return volumes


# ------------------------------------------------------------------------------------------------ phantom
class _Canvas:
    """A (rows, cols, slices) HU array with normalised coordinates: u (right->left), v (anterior->posterior)
    in [-1, 1] across the field of view, z in [0, 1] from the lowest (inferior) to the highest slice."""

    def __init__(self, size: tuple[int, int, int]):
        rows, cols, slices = size
        self.size = size
        self.u = ((np.arange(cols, dtype=np.float32) + 0.5) / cols * 2 - 1)[None, :, None]
        self.v = ((np.arange(rows, dtype=np.float32) + 0.5) / rows * 2 - 1)[:, None, None]
        self.z = ((np.arange(slices, dtype=np.float32) + 0.5) / slices)[None, None, :]
        self.hu = np.full(size, -1000.0, np.float32)
        self.tally: np.ndarray | None = None

    def ks(self, z0: float, z1: float) -> slice:
        """Slice indices covering [z0, z1) (at least one)."""
        n = self.size[2]
        k0 = min(max(round(z0 * n), 0), n - 1)
        k1 = min(max(round(z1 * n), k0 + 1), n)
        return slice(k0, k1)

    def zs(self, ks: slice) -> np.ndarray:
        return self.z[:, :, ks]

    def paint(self, mask: np.ndarray, value, ks: slice = slice(None)) -> None:
        sub = self.hu[:, :, ks]
        mask = np.broadcast_to(mask, sub.shape)
        if self.tally is not None:  # voxels painted per slice for the finding being drawn
            self.tally[ks] += mask.sum(axis=(0, 1))
        if np.ndim(value) == 0:
            np.putmask(sub, mask, np.float32(value))
        else:
            sub[mask] = np.broadcast_to(value, sub.shape)[mask]

    def index(self, u: float, v: float, z: float) -> tuple[int, int, int]:
        rows, cols, slices = self.size
        return (
            min(max(int((v + 1) / 2 * rows), 0), rows - 1),
            min(max(int((u + 1) / 2 * cols), 0), cols - 1),
            min(max(int(z * slices), 0), slices - 1),
        )


def _ellipse(u, v, cu, cv, au, av):
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1.0


def _rho2(u, v, cu, cv, au, av):
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2


def _segment_dist2(u, v, a: tuple[float, float], b: tuple[float, float]):
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / max(du * du + dv * dv, 1e-9), 0.0, 1.0)
    return (u - a[0] - t * du) ** 2 + (v - a[1] - t * dv) ** 2


def _profile(z, z0: float, z1: float, power: float = 4.0):
    """1 in the middle of [z0, z1], falling to 0 at its ends (flat-topped)."""
    t = (z - (z0 + z1) / 2) / max((z1 - z0) / 2, 1e-6)
    return np.sqrt(np.clip(1 - np.abs(t) ** power, 0, 1))


def _zrange(rng: np.random.Generator, lo: float, hi: float, frac=(0.15, 0.4)) -> tuple[float, float]:
    length = rng.uniform(*frac)
    if hi - lo <= length:
        return lo, hi
    start = rng.uniform(lo, hi - length)
    return start, start + length


class _Chest:
    """One scan's anatomy (shared by its reconstructions)."""

    def __init__(self, size: tuple[int, int, int], labels: tuple[int, ...], seed: int, key: int, scan_index: int):
        # Normal anatomy and each finding draw from their own streams: a scan's healthy anatomy does not depend
        # on its labels, and each finding is drawn the same whatever the others are.
        self.rng = r = _rng(seed, _ANATOMY, key, scan_index)
        self.fr = {name: _rng(seed, _ANATOMY, key, scan_index, 1 + i) for i, name in enumerate(CLASS_NAMES)}
        self.c = _Canvas(size)
        self.has = dict(zip(CLASS_NAMES, (bool(x) for x in labels), strict=True))
        z = self.c.z
        # --- nuisance parameters: body habitus, lungs, tissue densities ---
        self.body = (r.uniform(-0.03, 0.03), r.uniform(-0.06, 0.08), r.uniform(0.66, 0.9), r.uniform(0.5, 0.68))
        self.fat_t = r.uniform(0.03, 0.13)
        self.muscle_t = r.uniform(0.04, 0.07)
        self.fat_hu = r.uniform(-115, -85)
        self.muscle_hu = r.uniform(35, 55)
        self.bone_hu = r.uniform(350, 900)
        self.lung_hu = r.uniform(-870, -820)
        self.lung_gradient = r.uniform(10, 60)  # posterior (dependent) lung is denser
        self.lung_scale = r.uniform(0.85, 1.02)
        self.z_base = r.uniform(0.04, 0.14)  # diaphragm at the lateral recesses
        self.z_apex = r.uniform(0.9, 1.0)
        self.dome = r.uniform(0.12, 0.22)
        self.contrast = r.random() < 0.3
        self.blood_hu = r.uniform(140, 260) if self.contrast else r.uniform(35, 50)
        bu, bv, ba, bb = self.body
        self.body_axes = (ba * self._taper(z), bb * self._taper(z))
        inset = self.fat_t + self.muscle_t
        self.cav0 = (bu, bv, ba - inset, bb - inset)  # thoracic cavity at its widest
        self.cav = (bu, bv, self.body_axes[0] - inset, self.body_axes[1] - inset)
        self.spine_v = bv + (bb - inset) * 0.92
        self.keepout = np.zeros(self.c.size, bool)  # mediastinal structures the lung findings must not cover
        self.lung = np.zeros(self.c.size, bool)
        self.lungs: list[tuple] = []
        self._eroded: dict[int, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}  # finding -> voxels painted per slice

    @staticmethod
    def _taper(z):
        return 1 - 0.06 * np.clip((z - 0.75) / 0.25, 0, 1)  # the upper chest is slightly narrower

    # ------------------------------------------------------------------------------------------- build
    def build(self) -> np.ndarray:
        self._body()
        self._lungs_masks()
        self._mediastinum_masks()
        self.lung &= ~self.keepout
        self.c.paint(self.lung, self._lung_values())
        for step in (self._parenchyma_findings, self._lung_vessels_and_airways, self._airway_findings, self._heart,
                     self._vessels_and_mediastinum, self._dense_lung_findings, self._bones, self._devices):
            step()
            self._end()
        return self.c.hu

    def _begin(self, name: str) -> np.random.Generator:
        """Start drawing finding `name`: count the voxels it paints per slice; returns its random stream."""
        self.c.tally = self.counts.setdefault(name, np.zeros(self.c.size[2], np.int64))
        return self.fr[name]

    def _end(self) -> np.random.Generator:
        self.c.tally = None
        return self.rng

    def extents(self, min_voxels: int = 3) -> dict[str, tuple[int, int]]:
        """Per finding present: (first, last) slice index (inclusive) with at least `min_voxels` voxels of it."""
        out = {}
        for name, counts in self.counts.items():
            hit = np.flatnonzero(counts >= min_voxels)
            if hit.size:
                out[name] = (int(hit[0]), int(hit[-1]))
        return out

    def _body(self) -> None:
        c, r = self.c, self.rng
        bu, bv, _, _ = self.body
        ba, bb = self.body_axes
        # scanner table under the patient
        top = bv + float(np.max(bb)) + r.uniform(0.02, 0.06)
        table = (c.v >= top) & (c.v < top + r.uniform(0.03, 0.06)) & (np.abs(c.u) < 0.85)
        c.paint(table, r.uniform(-450, 50))
        c.paint(_ellipse(c.u, c.v, bu, bv, ba, bb), self.fat_hu)
        c.paint(_ellipse(c.u, c.v, bu, bv, ba - self.fat_t, bb - self.fat_t), self.muscle_hu)
        # subcutaneous fat strands / breast tissue vary the fat layer
        cu, cv, ca, cb = self.cav
        c.paint(_ellipse(c.u, c.v, cu, cv, ca, cb), self.fat_hu + r.uniform(-10, 15))  # mediastinal fat
        # abdomen below the diaphragm (liver on the right, spleen/stomach on the left)
        z_d = self._diaphragm()
        below = _ellipse(c.u, c.v, cu, cv, ca, cb) & (c.z < z_d)
        c.paint(below, np.where(c.u < cu + 0.1, r.uniform(50, 65), r.uniform(35, 50)).astype(np.float32))
        if r.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
            su, sv = cu + 0.35 * float(np.max(ca)), cv - 0.1
            k = c.ks(0.0, self.z_base + 0.08)
            bubble = _ellipse(c.u, c.v, su, sv, 0.1, 0.07) & (c.v < sv) & below[:, :, k]
            c.paint(bubble, -1000, k)
        if r.random() < 0.5:  # reconstruction circle: scanners pad outside it with -1024
            c.paint(c.u**2 + c.v**2 > 1.0, -1024)

    def _lung_ellipse(self, side: int, z):
        cu, cv, ca, cb = self.cav0
        ca, cb = ca * self._taper(z), cb * self._taper(z)
        s = self.lung_scale
        apex = np.sqrt(np.clip((self.z_apex - z) / 0.3, 0, 1))  # smaller toward the apex
        au = ca * (0.46 * s if side > 0 else 0.5 * s) * (0.35 + 0.65 * apex)
        av = cb * 0.86 * s * (0.4 + 0.6 * apex)
        lu = cu + side * ca * 0.47
        lv = cv + cb * 0.04 + (1 - apex) * cb * 0.1
        return lu, lv, au, av

    def _diaphragm(self):
        c = self.c
        z_d = np.full((*c.size[:2], 1), self.z_base, np.float32)
        for side in (-1, 1):
            lu, lv, au, av = self._lung_ellipse(side, np.float32(0.3))
            dome = self.dome * (1.1 if side < 0 else 0.9)  # right hemidiaphragm higher (liver)
            z_d = np.maximum(z_d, self.z_base + dome * np.clip(1 - _rho2(c.u, c.v, lu, lv, au, av), 0, 1))
        return z_d

    def _lungs_masks(self) -> None:
        c = self.c
        cu, cv, ca, cb = self.cav
        cavity = _ellipse(c.u, c.v, cu, cv, ca * 0.97, cb * 0.97)
        z_d = self._diaphragm()
        for side in (-1, 1):  # -1: patient right (low u), +1: patient left
            lu, lv, au, av = self._lung_ellipse(side, c.z)
            mask = _ellipse(c.u, c.v, lu, lv, au, av) & cavity & (c.z > z_d) & (c.z < self.z_apex)
            mask &= (c.u - cu) * side > 0.06  # the mediastinum separates the lungs
            self.lungs.append((side, lu, lv, au, av, mask))
            self.lung |= mask

    def _lung_values(self):
        c = self.c
        lv = self.cav0[1]
        grad = self.lung_gradient * np.clip((c.v - lv) / self.cav0[3], -1, 1)
        return (self.lung_hu + grad).astype(np.float32)

    # ------------------------------------------------------------------------------------------- mediastinum
    def _mediastinum_masks(self) -> None:
        c, r = self.c, self.rng
        cu, cv, ca, cb = self.cav0
        # heart: ellipsoid, anterior and to the left
        self.heart_r = r.uniform(0.2, 0.25)
        if self.has["Cardiomegaly"]:
            self.heart_r *= self.fr["Cardiomegaly"].uniform(1.3, 1.4)
        self.heart_c = (cu + ca * 0.12 + 0.3 * (self.heart_r - 0.22), cv - cb * 0.15)
        hz = r.uniform(0.2, 0.24) * (1.12 if self.has["Cardiomegaly"] else 1.0)
        zc = self.z_base + self.dome * 0.6 + hz * 0.55
        self.heart_z = (zc - hz, zc + hz)
        self.peri_t = self.fr["Pericardial effusion"].uniform(0.07, 0.1) if self.has["Pericardial effusion"] else 0.0
        self.epi_t = r.uniform(0.025, 0.04)
        self.heart_rz = self.heart_r * _profile(c.z, *self.heart_z, power=2.5)
        outer = self.heart_rz + self.peri_t + self.epi_t * 2
        self.keepout |= (c.u - self.heart_c[0]) ** 2 + ((c.v - self.heart_c[1]) / 0.85) ** 2 <= outer**2
        # aorta: ascending (anterior), arch, descending (left of the spine)
        self.aorta_r = r.uniform(0.06, 0.08)
        self.z_arch = r.uniform(0.72, 0.8)
        self.asc = (cu + 0.06, self.heart_c[1] - 0.05)
        self.desc = (cu + 0.15 + self.aorta_r * 0.5, self.spine_v - 0.2)
        self.trachea = (cu - 0.01, self.spine_v - 0.3)
        self.z_carina = r.uniform(0.6, 0.68)
        self.esoph = (cu + 0.03, self.spine_v - 0.16)
        self.keepout |= self._aorta_mask(self.aorta_r + 0.02)
        self.keepout |= _ellipse(c.u, c.v, *self.trachea, 0.09, 0.09) & (c.z > self.z_carina - 0.1)
        self.keepout |= _ellipse(c.u, c.v, cu, self.spine_v, 0.15, 0.14)
        self.keepout |= _ellipse(c.u, c.v, *self.esoph, 0.06, 0.06)
        # upper mediastinum between the lungs (fat with vessels)
        self.keepout |= _ellipse(c.u, c.v, cu, cv - 0.1, 0.16, cb * 0.8) & (c.z > self.heart_z[1] - 0.05)

    def _aorta_mask(self, radius: float):
        c = self.c
        asc = _ellipse(c.u, c.v, *self.asc, radius * 1.15, radius * 1.15) & (c.z > self.heart_z[1] - 0.12)
        asc &= c.z < self.z_arch
        desc = _ellipse(c.u, c.v, *self.desc, radius, radius) & (c.z < self.z_arch)
        arch_d = _segment_dist2(c.u, c.v, self.asc, self.desc)
        arch = (arch_d <= radius**2) & (np.abs(c.z - self.z_arch) < 0.045)
        return asc | desc | arch

    def _heart(self) -> None:
        c, r = self.c, self.rng
        hu0, hv0 = self.heart_c
        rz = self.heart_rz

        def heart(extra):
            return (c.u - hu0) ** 2 + ((c.v - hv0) / 0.85) ** 2 <= (rz + extra) ** 2

        present = rz > 0.02
        fat = self.fat_hu + r.uniform(0, 20)
        c.paint(heart(self.epi_t * 2 + self.peri_t) & present, fat)  # paracardiac fat
        if self.has["Pericardial effusion"]:  # fluid between the pericardium and the epicardial fat
            self._begin("Pericardial effusion")
            c.paint(heart(self.epi_t + self.peri_t) & present, self.fr["Pericardial effusion"].uniform(5, 15))
            self._end()
            c.paint(heart(self.epi_t) & present, fat)
        if self.has["Cardiomegaly"]:
            self._begin("Cardiomegaly")
        c.paint(heart(0.0) & present, r.uniform(35, 48))
        self._end()
        if self.contrast:  # enhanced ventricular cavity
            c.paint(heart(-0.45 * rz) & present, self.blood_hu)
        if self.has["Coronary artery wall calcification"]:
            r = self._begin("Coronary artery wall calcification")
            z0, z1 = _zrange(r, self.heart_z[0] + 0.05, self.heart_z[1], (0.15, 0.3))
            ks = c.ks(z0, z1)
            zs = c.zs(ks)
            for _ in range(r.integers(2, 4)):
                phi0 = r.uniform(-2.6, -0.2)  # anterior / left surface (LAD, LCx), -pi/2 is anterior
                phi = phi0 + r.uniform(-1.5, 1.5) * (zs - z0)
                rad = rz[:, :, ks] * 0.93
                pu, pv = hu0 + rad * np.cos(phi), hv0 + 0.85 * rad * np.sin(phi)
                dot = (c.u - pu) ** 2 + (c.v - pv) ** 2 <= r.uniform(0.04, 0.055) ** 2
                c.paint(dot & (rz[:, :, ks] > 0.05), r.uniform(600, 1200), ks)

    def _vessels_and_mediastinum(self) -> None:
        c, r = self.c, self.rng
        _cu, _cv, _ca, _cb = self.cav0
        c.paint(self._aorta_mask(self.aorta_r), self.blood_hu)
        # pulmonary trunk and SVC
        k = c.ks(self.heart_z[1] - 0.08, self.heart_z[1] + 0.08)
        c.paint(_ellipse(c.u, c.v, self.asc[0] + 0.14, self.asc[1] - 0.02, 0.08, 0.07), self.blood_hu, k)
        k = c.ks(self.heart_z[1] - 0.05, 0.95)
        c.paint(_ellipse(c.u, c.v, self.asc[0] - 0.13, self.asc[1] + 0.02, 0.04, 0.045), self.blood_hu, k)
        if self.has["Arterial wall calcification"]:
            r = self._begin("Arterial wall calcification")
            z0, z1 = _zrange(r, 0.15, self.z_arch + 0.03)
            ks = c.ks(z0, z1)
            for centre, radius in ((self.desc, self.aorta_r), (self.asc, self.aorta_r * 1.15)):
                if centre is self.asc and r.random() < 0.5:
                    continue
                a0 = r.uniform(-np.pi, np.pi)
                width = r.uniform(1.5, 2.8)
                ang = np.arctan2(c.v - centre[1], c.u - centre[0])
                dang = np.angle(np.exp(1j * (ang - a0)))
                d2 = (c.u - centre[0]) ** 2 + (c.v - centre[1]) ** 2
                arc = (d2 >= (radius - 0.04) ** 2) & (d2 <= (radius + 0.012) ** 2) & (np.abs(dang) < width / 2)
                kk = ks if centre is self.desc else c.ks(max(z0, self.heart_z[1] - 0.1), max(z1, self.z_arch))
                c.paint(arc, r.uniform(700, 1400), kk)
            if z1 > self.z_arch - 0.04:  # plaques on the arch too
                ka = c.ks(self.z_arch - 0.04, self.z_arch + 0.04)
                d2 = _segment_dist2(c.u, c.v, self.asc, self.desc)
                rim = (d2 >= (self.aorta_r - 0.03) ** 2) & (d2 <= (self.aorta_r + 0.01) ** 2) & (c.v < self.asc[1])
                c.paint(rim, r.uniform(700, 1400), ka)
        r = self._end()
        # esophagus (with a little air) and trachea / main bronchi
        c.paint(_ellipse(c.u, c.v, *self.esoph, 0.04, 0.035), self.muscle_hu)
        if r.random() < 0.5:
            c.paint(_ellipse(c.u, c.v, *self.esoph, 0.015, 0.015), -900)
        tu, tv = self.trachea
        kt = c.ks(self.z_carina, 1.0)
        tr = r.uniform(0.055, 0.07)
        c.paint(_ellipse(c.u, c.v, tu, tv, tr + 0.015, tr + 0.015), self.muscle_hu, kt)
        c.paint(_ellipse(c.u, c.v, tu, tv, tr, tr * 0.9), -1000, kt)
        kb = c.ks(self.z_carina - 0.12, self.z_carina)
        zb = c.zs(kb)
        spread = 0.05 + (self.z_carina - zb) * 1.2
        for side in (-1, 1):
            bu = tu + side * spread
            c.paint(_ellipse(c.u, c.v, bu, tv + 0.02, 0.05, 0.05), self.muscle_hu, kb)
            c.paint(_ellipse(c.u, c.v, bu, tv + 0.02, 0.036, 0.036), -1000, kb)
        # mediastinal lymph nodes: small in everyone, large with lymphadenopathy
        sites = [(tu - 0.1, tv - 0.02), (tu + 0.1, tv - 0.08), (tu, tv + 0.1), (tu - 0.06, tv - 0.14)]
        for su, sv in sites:
            zc = r.uniform(self.z_carina - 0.1, self.z_carina + 0.15)
            ks = c.ks(zc - 0.04, zc + 0.04)
            c.paint(_ellipse(c.u, c.v, su, sv, 0.025, 0.025), r.uniform(30, 45), ks)
        if self.has["Lymphadenopathy"]:
            r = self._begin("Lymphadenopathy")
            z0, z1 = _zrange(r, self.z_carina - 0.2, self.z_carina + 0.25)
            chosen = r.permutation(len(sites))[: r.integers(2, 4)]
            for i in chosen:
                su, sv = sites[i]
                ks = c.ks(z0, z1)
                rad = r.uniform(0.07, 0.09) * _profile(c.zs(ks), z0, z1)
                c.paint((c.u - su) ** 2 + (c.v - sv) ** 2 <= rad**2, r.uniform(35, 50), ks)
        if self.has["Hiatal hernia"]:
            r = self._begin("Hiatal hernia")
            z0, z1 = _zrange(r, self.z_base, self.heart_z[0] + 0.25, (0.15, 0.3))
            ks = c.ks(z0, z1)
            rad = r.uniform(0.14, 0.18) * _profile(c.zs(ks), z0, z1)
            hu_, hv_ = self.esoph[0] + 0.04, self.esoph[1] - 0.08
            blob = (c.u - hu_) ** 2 + (c.v - hv_) ** 2 <= rad**2
            c.paint(blob, r.uniform(10, 30), ks)
            c.paint(blob & (c.v < hv_ - r.uniform(-0.02, 0.04)), -1000, ks)  # air-fluid level, air anterior

    # ------------------------------------------------------------------------------------------- lungs
    def _lobules(self, r, pu, pv, ks: slice, prof, spread: float, ra: tuple, rb: tuple) -> np.ndarray:
        """2-3 overlapping ellipses around (pu, pv), radii scaled per slice by `prof`: a lobulated airspace
        process (opacity, consolidation) over the slices `ks`."""
        c = self.c
        mask = np.zeros(self.lung[:, :, ks].shape, bool)
        for _ in range(r.integers(2, 4)):
            du, dv = r.uniform(-spread, spread, 2)
            a, b = r.uniform(*ra), r.uniform(*rb)
            mask |= _rho2(c.u, c.v, pu + du, pv + dv, a * prof + 1e-3, b * prof + 1e-3) <= 1
        return mask

    def _inner(self, margin: float) -> np.ndarray:
        """Lung voxels at least `margin` (normalised units) from the lung's edge, in-plane."""
        steps = int(round(margin * min(self.c.size[:2]) / 2))  # noqa: RUF046 (numpy scalars round to floats)
        if steps not in self._eroded:
            self._eroded[steps] = _erode(self.lung, steps)
        return self._eroded[steps]

    def _side(self, side: int):
        return (self.c.u - self.cav0[0]) * side > 0

    def _lung_point(self, r: np.random.Generator, zlo: float, zhi: float, margin: float = 0.0, side=None):
        """A random (u, v, z, side) in the lung, at least `margin` from its edge, at height in [zlo, zhi]."""
        c = self.c
        ks = c.ks(zlo, zhi)
        rows, cols, _ = c.size
        for m in (margin, margin / 2, 0.0):
            mask = self._inner(m)[:, :, ks]
            if side is not None:
                mask = mask & self._side(side)
            flat = np.flatnonzero(mask)
            if flat.size:
                break
        else:  # no lung in that range: the middle of the requested lung
            s = side or 1
            lu, lv, _, _ = self._lung_ellipse(s, np.float32((zlo + zhi) / 2))
            return float(lu), float(lv), (zlo + zhi) / 2, s
        row, col, k = np.unravel_index(flat[r.integers(flat.size)], mask.shape)
        u = (col + r.uniform(0.25, 0.75)) / cols * 2 - 1
        v = (row + r.uniform(0.25, 0.75)) / rows * 2 - 1
        z = (ks.start + k + 0.5) / c.size[2]
        return float(u), float(v), float(z), (1 if u > self.cav0[0] else -1)

    def _periphery(self, ks: slice, margin: float):
        """Subpleural lung: lung voxels of slab `ks` within `margin` of the lung's edge."""
        return self.lung[:, :, ks] & ~self._inner(margin)[:, :, ks]

    def _height_above_back(self, mask: np.ndarray) -> np.ndarray:
        """For each voxel of `mask`, its distance (normalised v) above the mask's posterior edge in its column."""
        rows = mask.shape[0]
        last = rows - 1 - np.argmax(mask[::-1], axis=0)  # lowest (most posterior) row per (col, slice)
        dist = (last[None] - np.arange(rows)[:, None, None]) * (2.0 / rows)
        return np.where(mask, dist, np.inf).astype(np.float32)

    def _parenchyma_findings(self) -> None:
        c, r = self.c, self.rng
        if self.has["Mosaic attenuation pattern"]:
            r = self._begin("Mosaic attenuation pattern")
            z0, z1 = _zrange(r, 0.1, 0.95)
            ks = c.ks(z0, z1)
            field_ = np.zeros((c.size[0], c.size[1], 1), np.float32)
            for _ in range(3):
                k, th, ph = r.uniform(9, 14), r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
                field_ = field_ + np.cos(k * (c.u * np.cos(th) + c.v * np.sin(th)) + ph)
            field_ = field_ + 0.8 * np.cos(r.uniform(10, 20) * c.zs(ks) + r.uniform(0, 6))
            lung = self.lung[:, :, ks]
            c.paint(lung & (field_ > 0), r.uniform(-760, -740), ks)
            c.paint(lung & (field_ <= 0), r.uniform(-905, -890), ks)
        if self.has["Emphysema"]:
            r = self._begin("Emphysema")
            z0, z1 = _zrange(r, 0.55, self.z_apex)
            clusters = [self._lung_point(r, z0, z1, 0.1) for _ in range(r.integers(2, 4))]
            for _ in range(r.integers(18, 30)):  # centrilobular holes, clustered, in the upper lobes
                cu_, cv_, _, _ = clusters[r.integers(len(clusters))]
                pu, pv, zc = cu_ + r.normal(0, 0.07), cv_ + r.normal(0, 0.07), r.uniform(z0, z1)
                rad, hz = r.uniform(0.05, 0.08), r.uniform(0.04, 0.07)
                ks = c.ks(zc - hz, zc + hz)
                rr = rad * _profile(c.zs(ks), zc - hz, zc + hz, 2)
                hole = ((c.u - pu) ** 2 + (c.v - pv) ** 2 <= rr**2) & self.lung[:, :, ks]
                c.paint(hole, r.uniform(-1000, -985), ks)
        if self.has["Lung opacity"]:
            r = self._begin("Lung opacity")
            z0, z1 = _zrange(r, 0.15, 0.95)
            pu, pv, _, _ = self._lung_point(r, z0 + 0.3 * (z1 - z0), z1 - 0.3 * (z1 - z0), 0.1)
            ks = c.ks(z0, z1)
            prof = _profile(c.zs(ks), z0, z1, 2.5)
            mask = self._lobules(r, pu, pv, ks, prof, 0.08, (0.15, 0.22), (0.12, 0.18))
            c.paint(mask & self.lung[:, :, ks], r.uniform(-600, -500), ks)

    def _tube(self, ks: slice, pu: float, pv: float, zc: float, du: float, dv: float):
        zs = self.c.zs(ks)
        return pu + du * (zs - zc), pv + dv * (zs - zc)

    def _lung_vessels_and_airways(self) -> None:
        c, r = self.c, self.rng
        # vessels: thinner than a voxel at this resolution, so partial volume makes them faint (-450..-200 HU)
        vessel_hu = r.uniform(-250, -150) + (100 if self.contrast else 0)
        for _ in range(r.integers(15, 40)):
            pu, pv, zc, _ = self._lung_point(r, 0.05, 0.95)
            h = r.uniform(0.08, 0.25)
            ks = c.ks(zc - h, zc + h)
            tu, tv = self._tube(ks, pu, pv, zc, *r.uniform(-0.4, 0.4, 2))
            rad = r.uniform(0.012, 0.025)
            mask = ((c.u - tu) ** 2 + (c.v - tv) ** 2 <= rad**2) & self.lung[:, :, ks]
            c.paint(mask, vessel_hu + r.uniform(-50, 50), ks)
        for _ in range(r.integers(2, 7)):  # small airways with thin walls
            pu, pv, zc, _ = self._lung_point(r, 0.15, 0.85, 0.05)
            h = r.uniform(0.08, 0.2)
            ks = c.ks(zc - h, zc + h)
            tu, tv = self._tube(ks, pu, pv, zc, *r.uniform(-0.2, 0.2, 2))
            d2 = (c.u - tu) ** 2 + (c.v - tv) ** 2
            lumen = r.uniform(0.018, 0.03)
            c.paint((d2 <= (lumen + 0.012) ** 2) & self.lung[:, :, ks], -150, ks)
            c.paint((d2 <= lumen**2) & self.lung[:, :, ks], -1000, ks)

    def _airway_findings(self) -> None:
        c, r = self.c, self.rng
        for finding, count, lumen_r, wall_r, wall_hu, zone in (
            ("Peribronchial thickening", (8, 14), (0.025, 0.032), (0.05, 0.06), (-120, -40), (0.2, 0.8)),
            ("Bronchiectasis", (4, 8), (0.08, 0.1), (0.03, 0.035), (0, 40), (0.08, 0.7)),
        ):
            if not self.has[finding]:
                continue
            r = self._begin(finding)
            z0, z1 = _zrange(r, *zone)
            side = int(r.choice((-1, 1))) if r.random() < 0.6 else None
            ks = c.ks(z0, z1)
            for _ in range(r.integers(*count)):
                pu, pv, zc, _ = self._lung_point(r, z0, z1, 0.08, side=side)
                tu, tv = self._tube(ks, pu, pv, zc, *r.uniform(-0.15, 0.15, 2))
                d2 = (c.u - tu) ** 2 + (c.v - tv) ** 2
                lumen = r.uniform(*lumen_r)
                wall = r.uniform(*wall_r)
                lung = self.lung[:, :, ks]
                c.paint((d2 <= (lumen + wall) ** 2) & lung, r.uniform(*wall_hu), ks)
                c.paint((d2 <= lumen**2) & lung, -1000, ks)

    def _dense_lung_findings(self) -> None:
        c, r = self.c, self.rng
        if self.has["Interlobular septal thickening"]:
            r = self._begin("Interlobular septal thickening")
            z0, z1 = _zrange(r, 0.1, 0.9)
            ks = c.ks(z0, z1)
            sp, th, off = r.uniform(0.11, 0.15), r.uniform(0, np.pi / 2), r.uniform(0, 1, 2)
            a = (c.u * np.cos(th) + c.v * np.sin(th)) / sp + off[0]
            b = (-c.u * np.sin(th) + c.v * np.cos(th)) / sp + off[1]
            w = 0.018 / sp
            grid = (np.abs(a - np.round(a)) < w) | (np.abs(b - np.round(b)) < w)
            c.paint(grid & self._periphery(ks, 0.14), r.uniform(-330, -270), ks)
        if self.has["Pulmonary fibrotic sequela"]:
            r = self._begin("Pulmonary fibrotic sequela")
            z0, z1 = _zrange(r, 0.05, 0.55)
            ks = c.ks(z0, z1)
            zs = c.zs(ks)
            periph = self._periphery(ks, 0.2)
            for _ in range(r.integers(8, 13)):
                # a band from the pleura inward: start near the edge, point toward the lung's middle
                pu, pv, zc, side = self._lung_point(r, z0, z1)
                edge = self._periphery(c.ks(zc, zc + 0.01), 0.05)[:, :, 0]
                rows_, cols_ = np.nonzero(edge & self._side(side)[:, :, 0])
                if rows_.size:
                    i = r.integers(rows_.size)
                    pu = (cols_[i] + 0.5) / c.size[1] * 2 - 1
                    pv = (rows_[i] + 0.5) / c.size[0] * 2 - 1
                lu, lv, _, _ = self._lung_ellipse(side, np.float32(zc))
                th = float(np.arctan2(lv - pv, lu - pu)) + r.uniform(-0.6, 0.6)
                length = r.uniform(0.18, 0.3)
                a = (pu, pv)
                b = (pu + length * np.cos(th), pv + length * np.sin(th))
                du, dv = r.uniform(-0.2, 0.2, 2)
                d2 = _segment_dist2(c.u - du * (zs - zc), c.v - dv * (zs - zc), a, b)
                c.paint((d2 <= r.uniform(0.035, 0.045) ** 2) & periph, r.uniform(-150, -50), ks)
        if self.has["Consolidation"]:
            r = self._begin("Consolidation")
            z0, z1 = _zrange(r, 0.08, 0.85)
            pu, pv, _, _ = self._lung_point(r, z0 + 0.3 * (z1 - z0), z1 - 0.3 * (z1 - z0), 0.1)
            ks = c.ks(z0, z1)
            prof = _profile(c.zs(ks), z0, z1, 3)
            mask = self._lobules(r, pu, pv, ks, prof, 0.06, (0.2, 0.27), (0.17, 0.23))
            mask &= self.lung[:, :, ks]
            c.paint(mask, r.uniform(25, 45), ks)
            for _ in range(r.integers(2, 4)):  # air bronchograms
                th = r.uniform(0, 2 * np.pi)
                length = r.uniform(0.14, 0.2)
                a = (pu - 0.03 * np.cos(th), pv - 0.03 * np.sin(th))
                b = (pu + length * np.cos(th), pv + length * np.sin(th))
                c.paint((_segment_dist2(c.u, c.v, a, b) <= 0.028**2) & mask, -950, ks)
        if self.has["Atelectasis"]:
            # a tall wedge rising from the posterior (dependent) edge of a lower lobe: apex toward the hilum
            r = self._begin("Atelectasis")
            z0, z1 = _zrange(r, 0.2, 0.7)
            ks = c.ks(z0, z1)
            zs = c.zs(ks)
            for side in (-1, 1) if r.random() < 0.35 else (int(r.choice((-1, 1))),):
                mask = self.lung[:, :, ks] & self._side(side)
                height = self._height_above_back(mask)
                lu, _, au, _ = self._lung_ellipse(side, zs)
                u0 = lu + side * au * r.uniform(-0.2, 0.35)
                tent = np.clip(1 - np.abs(c.u - u0) / r.uniform(0.16, 0.22), 0, 1)
                peak = r.uniform(0.3, 0.4) * _profile(zs, z0, z1, 3)
                c.paint(height < peak * tent, r.uniform(50, 70), ks)
        if self.has["Pleural effusion"]:
            # dependent fluid: a layer of even depth along the whole posterior edge, deepest at the base
            r = self._begin("Pleural effusion")
            z0, z1 = _zrange(r, 0.0, 0.55)
            z0 = min(z0, r.uniform(0.0, 0.08))  # dependent fluid reaches the costophrenic recess
            ks = c.ks(z0, z1)
            zs = c.zs(ks)
            depth = r.uniform(0.14, 0.22) * np.clip((z1 - zs) / (z1 - z0) * 1.6, 0, 1)
            for side in (-1, 1) if r.random() < 0.5 else (int(r.choice((-1, 1))),):
                height = self._height_above_back(self.lung[:, :, ks] & self._side(side))
                c.paint(height < depth, r.uniform(5, 15), ks)
        if self.has["Lung nodule"]:
            r = self._begin("Lung nodule")
            length = r.uniform(0.14, 0.2)
            pu, pv, zc, _ = self._lung_point(r, 0.2, 0.85, 0.16)
            z0, z1 = zc - length / 2, zc + length / 2
            ks = c.ks(z0, z1)
            rad = r.uniform(0.11, 0.14) * _profile(c.zs(ks), z0, z1, 3)
            c.paint(((c.u - pu) ** 2 + (c.v - pv) ** 2 <= rad**2) & self.lung[:, :, ks], r.uniform(30, 60), ks)

    # ------------------------------------------------------------------------------------------- bones
    def _bones(self) -> None:
        c, r = self.c, self.rng
        cu, cv, ca, cb = self.cav0
        bone = self.bone_hu
        sv = self.spine_v
        # vertebral body (cortex brighter), spinal canal, posterior elements
        c.paint(_ellipse(c.u, c.v, cu, sv, 0.12, 0.1), bone * 1.5)
        c.paint(_ellipse(c.u, c.v, cu, sv, 0.095, 0.075), bone)
        c.paint(_ellipse(c.u, c.v, cu, sv + 0.15, 0.04, 0.04), self.muscle_hu - 20)
        c.paint(_ellipse(c.u, c.v, cu, sv + 0.15, 0.11, 0.055) & ~_ellipse(c.u, c.v, cu, sv + 0.15, 0.045, 0.045),
                bone * 1.3)
        c.paint(_ellipse(c.u, c.v, cu, sv + 0.27, 0.025, 0.07), bone * 1.3)
        # sternum
        _ba, bb = self.body_axes
        st_v = self.body[1] - bb + self.fat_t + self.muscle_t * 0.5
        c.paint(_ellipse(c.u, c.v, cu, st_v, 0.07, 0.03) & (c.z > 0.25), bone * 1.2)
        # ribs: oblique cuts, appearing at a different angle on successive slices
        ring_a, ring_b = ca + self.muscle_t * 0.45, cb + self.muscle_t * 0.45
        n_ribs = r.integers(5, 8)
        freq = r.uniform(7, 10)
        for side in (-1, 1):
            for i in range(n_ribs):
                th0 = np.pi / 2 + side * (0.35 + i * 2.3 / n_ribs)
                th = th0 + 0.4 * np.sin(freq * c.z + i * 1.3 + side)
                present = np.sin(freq * 2 * c.z + i * 2.1) > -0.2
                ru, rv = cu + ring_a * np.cos(th), cv + ring_b * np.sin(th)
                seg = (c.u - ru) ** 2 + (c.v - rv) ** 2 <= r.uniform(0.028, 0.04) ** 2
                c.paint(seg & present, bone * r.uniform(1.0, 1.5))
        # dense spots (bone islands, cortical thickening, degenerative sclerosis) up to the 3071 HU ceiling,
        # of very different total size between people: a very bright voxel is no evidence of medical material
        for _ in range(r.integers(0, 13)):
            zc = r.uniform(0.05, 0.95)
            hz = r.uniform(0.02, 0.1)
            ks = c.ks(zc - hz, zc + hz)
            if r.random() < 0.5:
                pu, pv = cu + r.uniform(-0.07, 0.07), sv + r.uniform(-0.05, 0.05)
            else:  # posterior ribs (costovertebral sclerosis)
                th = r.uniform(0.2, np.pi - 0.2)
                pu, pv = cu + ring_a * np.cos(th), cv + ring_b * np.sin(th)
            rad = r.uniform(0.025, 0.06)
            c.paint(_ellipse(c.u, c.v, pu, pv, rad, rad * r.uniform(0.6, 1.4)), r.uniform(1600, 3100), ks)

    def _devices(self) -> None:
        if not self.has["Medical material"]:
            return
        c, r = self.c, self._begin("Medical material")
        ba, bb = self.body_axes
        z0, z1 = _zrange(r, 0.35, 0.98)
        ks = c.ks(z0, z1)
        side = int(r.choice((-1, 1)))
        # a port / pacemaker generator in the anterior chest wall, with its lead toward the mediastinum
        th = -np.pi / 2 + side * r.uniform(0.35, 0.7)
        bu, bv, _, _ = self.body
        depth = self.fat_t * 0.6 + 0.01
        ax = float(np.max(ba)) - depth
        ay = float(np.max(bb)) - depth
        pu, pv = bu + ax * np.cos(th), bv + ay * np.sin(th)
        prof = _profile(c.zs(ks), z0, z1, 4)
        size = r.uniform(0.035, 0.05)
        body = _rho2(c.u, c.v, pu, pv, size * 1.4 * prof + 1e-3, size * 0.7 * prof + 1e-3) <= 1
        c.paint(body, r.uniform(2200, 3100), ks)
        lead = (_segment_dist2(c.u, c.v, (pu, pv), (self.asc[0] - 0.13, self.asc[1])) <= 0.016**2)
        c.paint(lead & (prof > 0.2), r.uniform(1200, 2200), ks)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane binary erosion by `steps` voxels (4-neighbourhood, repeated)."""
    out = mask.copy()
    for _ in range(steps):
        prev = out.copy()
        out[1:] &= prev[:-1]
        out[:-1] &= prev[1:]
        out[:, 1:] &= prev[:, :-1]
        out[:, :-1] &= prev[:, 1:]
        out[0] = out[-1] = False
        out[:, 0] = out[:, -1] = False
    return out


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


def synthesize_scan(
    seed: int, key: int, scan_index: int, size: tuple[int, int, int], labels
) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Noise-free HU phantom of one scan: (rows, cols, slices) float32, and each finding's slice range.

    The ranges are (first, last) slice indices, inclusive, of the slices showing at least 3 voxels of the finding:
    ground truth that volume labels lack (for tests, and for checking slice-level models).
    """
    chest = _Chest(_check_size(tuple(size)), tuple(int(x) for x in labels), seed, key, scan_index)
    return chest.build(), chest.extents()


def reconstruct(clean: np.ndarray, seed: int, key: int, scan_index: int, recon: int) -> np.ndarray:
    """One reconstruction of a scan: blur (kernel) + noise, rounded and clipped to the 12-bit HU range."""
    rng = _rng(seed, _NOISE, key, scan_index, recon)
    if recon == 1:
        weight, sigma = rng.uniform(0.12, 0.22), rng.uniform(10, 30)
    else:  # a softer kernel: smoother, less noise
        weight, sigma = rng.uniform(0.25, 0.32), rng.uniform(8, 18)
    vol = _blur(clean, weight)
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(sigma)
    pad = clean <= HU_MIN  # the padding outside the reconstruction circle stays exact
    vol[pad] = HU_MIN
    return np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.float32)


# ------------------------------------------------------------------------------------------------ writing
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
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


_SCANNERS = (
    ("Philips", ("iCT 256", "Brilliance 64", "Ingenuity CT"), ("YA", "YB", "L"), ("B", "C"), "Z DOM"),
    ("SIEMENS", ("SOMATOM Definition Edge", "SOMATOM go.Up"), ("Br64", "I70f"), ("Br40", "I30f"), "XYZ_EC"),
    ("GE MEDICAL SYSTEMS", ("Revolution EVO", "Optima CT660"), ("LUNG", "BONE"), ("STANDARD", "SOFT"), "SmartmA"),
    ("TOSHIBA", ("Aquilion ONE", "Aquilion Prime"), ("FC52", "FC86"), ("FC13", "FC18"), "NONE"),
)


@dataclass(frozen=True)
class _Geometry:
    fov: int
    xy: float
    zsp: float
    ipp: tuple[float, float, float]

    def affine(self) -> np.ndarray:
        """Voxel (x=col, y=row, z=slice) -> RAS mm, as a DICOM (LPS) conversion writes it."""
        aff = np.diag([-self.xy, -self.xy, self.zsp, 1.0])
        aff[:3, 3] = (-self.ipp[0], -self.ipp[1], self.ipp[2])
        return aff


def _scan_meta(seed: int, vol: _Volume, size: tuple[int, int, int]) -> tuple[_Geometry, dict]:
    """Scanner metadata of a scan (both reconstructions share everything but the kernel)."""
    rows, cols, slices = size
    prng = _rng(seed, _PATIENT, vol.key)
    sex = "M" if prng.random() < 0.55 else "F"
    age = int(prng.integers(22, 90))
    r = _rng(seed, _META, vol.key, vol.scan_index)
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
    return _Geometry(fov, xy, zsp, ipp), row


def generate_dataset(
    out_dir: str | os.PathLike,
    num_volumes: int = 120,
    size: tuple[int, int, int] = (64, 64, 48),
    seed: int = 0,
    valid_fraction: float = 0.25,
    fixed_fraction: float = 0.5,
    workers: int = 1,
) -> SyntheticSummary:
    """Write a CT-RATE-shaped data set of `num_volumes` volumes of `size` (rows, cols, slices) under `out_dir`.

    The same arguments always give byte-identical files, whatever `workers` (processes drawing scans in parallel:
    each scan's content depends only on the seed and its patient). Patients are split train/valid by patient
    (`valid_fraction` of them, at least 2); about `fixed_fraction` of the patients of each split are stored in the
    `_fixed` trees. Existing files of an earlier run are overwritten; volume files under the split trees that
    this run would not write are an error (mixing two data sets silently would corrupt both).
    """
    size = _check_size(tuple(size))
    if int(num_volumes) != num_volumes or num_volumes < 3:
        raise ValueError(f"num_volumes must be an int >= 3 (a train and two valid patients); got {num_volumes!r}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1); got {valid_fraction}")
    if not 0 <= fixed_fraction <= 1:
        raise ValueError(f"fixed_fraction must be in [0, 1]; got {fixed_fraction}")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    out = Path(out_dir)
    root = out / "dataset"
    plan = _plan(int(num_volumes), int(seed), float(valid_fraction), float(fixed_fraction))
    stale = _stale_volumes(root, {v.relpath() for v in plan})
    if stale:
        raise FileExistsError(
            f"{root} holds {len(stale)} volume(s) that are not part of this data set (e.g. {stale[0]}); "
            "use an empty directory"
        )
    train = [v for v in plan if v.split == "train"]
    nan_pick = next((v for v in train if v.patient == 2), train[0])
    scans: dict[tuple[int, int], list[_Volume]] = {}  # the reconstructions of one scan share its drawing
    for vol in plan:
        scans.setdefault((vol.key, vol.scan_index), []).append(vol)
    write_scan = functools.partial(_write_scan, seed, size, root, nan_pick.name)
    if workers > 1 and len(scans) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn: the caller may hold threads (Ray, torch) that a forked child would inherit half-copied
        with ProcessPoolExecutor(min(int(workers), len(scans)), mp_context=get_context("spawn")) as pool:
            written = [w for group in pool.map(write_scan, scans.values(), chunksize=8) for w in group]
    else:
        written = [w for group in scans.values() for w in write_scan(group)]
    label_rows: dict[str, list] = {"train": [], "valid": []}
    meta_rows: dict[str, list] = {"train": [], "valid": []}
    paths: dict[str, Path] = {}
    extents: dict[str, dict[str, tuple[int, int]]] = {}
    for vol, path, extent, meta in written:  # in plan order: a patient's scans and reconstructions are consecutive
        paths[vol.name] = path
        extents[vol.name] = extent
        label_rows[vol.split].append([vol.name, *vol.labels])
        meta_rows[vol.split].append([vol.name, *(meta[col] for col in METADATA_COLUMNS[1:])])
    labels_csv, metadata_csv = {}, {}
    for split in ("train", "valid"):
        labels_csv[split] = root / LABELS_DIR / f"{split}_predicted_labels.csv"
        _write_atomic(labels_csv[split], _csv_bytes((VOLUME_COLUMN, *CLASS_NAMES), label_rows[split]))
        metadata_csv[split] = root / METADATA_DIR / METADATA_FILES[split]
        _write_atomic(metadata_csv[split], _csv_bytes(METADATA_COLUMNS, meta_rows[split]))
    return SyntheticSummary(
        out_dir=out,
        dataset_dir=root,
        size=size,
        seed=int(seed),
        num_volumes=len(plan),
        num_train_volumes=len(train),
        num_valid_volumes=len(plan) - len(train),
        num_train_patients=len({v.key for v in train}),
        num_valid_patients=len({v.key for v in plan if v.split == "valid"}),
        num_fixed_volumes=sum(v.fixed for v in plan),
        labels_csv=labels_csv,
        metadata_csv=metadata_csv,
        volume_paths=paths,
        finding_slices=extents,
        fixed_volumes=tuple(v.name for v in plan if v.fixed),
        nan_affine_volume=nan_pick.name,
    )


def _write_scan(seed: int, size: tuple[int, int, int], root: Path, nan_affine_name: str,
                volumes: list[_Volume]) -> list[tuple[_Volume, Path, dict[str, tuple[int, int]], dict]]:
    """Draw one scan and write each of its reconstructions; returns (volume, path, finding extents, metadata)."""
    clean, extents = synthesize_scan(seed, volumes[0].key, volumes[0].scan_index, size, volumes[0].labels)
    written = []
    for vol in volumes:
        hu = reconstruct(clean, seed, vol.key, vol.scan_index, vol.recon)
        geometry, meta = _scan_meta(seed, vol, size)
        payload = _nifti_bytes(hu, vol.fixed, geometry.affine(), (geometry.xy, geometry.xy, geometry.zsp),
                               nan_affine=vol.name == nan_affine_name)
        path = root / vol.relpath()
        _write_atomic(path, gzip.compress(payload, compresslevel=6, mtime=0))
        written.append((vol, path, dict(extents), meta))
    return written


def _stale_volumes(root: Path, expected: set[Path]) -> list[Path]:
    stale = []
    for tree in ("train", "valid", "train_fixed", "valid_fixed"):
        base = root / tree
        if base.is_dir():
            stale += [p for p in sorted(base.rglob("*.nii.gz")) if p.relative_to(root) not in expected]
    return stale
