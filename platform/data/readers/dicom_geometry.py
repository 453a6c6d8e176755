"""Where a DICOM series' slices lie, and the uniform grid they are put on: sorting, spacing, gaps and gantry tilt.

Slices are ordered by `ImagePositionPatient` projected on the normal of `ImageOrientationPatient` (file names and
`InstanceNumber` mean nothing). The gaps between consecutive positions decide what happens:
- all within 1% (or 0.01 mm) of their median: the slices are the grid;
- uneven, or a few slices missing (no gap above `MAX_GAP_FACTOR` times the median): linear interpolation along
  the normal onto a grid at the median spacing, reported in the volume's notes;
- a larger gap, two slices at one position, differing orientations or sizes: refused, with the reason.
Slices whose origins also move within the slice plane (gantry tilt, a sheared stack) are shifted back onto the
first slice's in-plane grid (linear interpolation, air outside), reported in the notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ctplatform.data.errors import UnusableContentError
from ctplatform.data.hounsfield import HU_MIN

MAX_GAP_FACTOR = 3.0  # a gap above this many median spacings is missing anatomy: refused, never interpolated
RELATIVE_TOLERANCE = 0.01  # gaps within 1% of the median (or ABSOLUTE_TOLERANCE_MM) count as even
ABSOLUTE_TOLERANCE_MM = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class SliceGeometry:
    position: np.ndarray  # ImagePositionPatient (3,), mm, LPS
    orientation: np.ndarray  # ImageOrientationPatient (6,): row direction, then column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    shape: tuple[int, int]  # (rows, cols)


@dataclass
class GridPlan:
    """How sorted source slices become the output volume."""

    order: np.ndarray  # source slice indices, ordered along the normal (inferior -> superior for axial)
    spacing: tuple[float, float, float]  # (slice, row, col) mm
    affine: np.ndarray  # 4x4, voxel (col, row, slice) -> RAS mm
    # Per sorted source slice: its in-plane offset from the first slice's grid, in (row, col) pixels; None: none.
    inplane_shift: np.ndarray | None = None
    # Output slice k = (1 - w) * sorted[lower[k]] + w * sorted[lower[k] + 1]; None: the sorted slices themselves.
    lower: np.ndarray | None = None
    weight: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def resampled(self) -> bool:
        return self.inplane_shift is not None or self.lower is not None

    @property
    def num_slices(self) -> int:
        return len(self.order) if self.lower is None else len(self.lower)


def plan_grid(slices: list[SliceGeometry], label: str) -> GridPlan:
    """Sort the slices along their normal and decide the uniform grid; refuse what cannot be put on one."""
    if len(slices) < 2:
        raise UnusableContentError(label, "the series has one slice: a CT volume needs at least two")
    first = slices[0]
    if any(s.shape != first.shape for s in slices):
        raise UnusableContentError(label, "the slices differ in size (rows x columns): not one volume")
    orientations = np.array([s.orientation for s in slices], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise UnusableContentError(label, "the slices differ in ImageOrientationPatient: not one volume")
    spacings = np.array([s.pixel_spacing for s in slices], dtype=np.float64)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise UnusableContentError(label, "the slices differ in PixelSpacing: not one volume")
    row_dir, col_dir = _unit(orientations[0][:3], label), _unit(orientations[0][3:], label)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise UnusableContentError(label, "ImageOrientationPatient's row and column directions are not orthogonal")
    normal = np.cross(row_dir, col_dir)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    heights, positions = heights[order], positions[order]
    gaps = np.diff(heights)
    spacing_mm = float(np.median(gaps))
    tolerance = max(ABSOLUTE_TOLERANCE_MM, RELATIVE_TOLERANCE * spacing_mm)
    if gaps.min() < tolerance:
        same = int((gaps < tolerance).sum())
        raise UnusableContentError(label, f"{same + 1} slices share one position along the slice normal (several "
                                          "images per position, e.g. phases or echoes): not one volume")
    if gaps.max() > MAX_GAP_FACTOR * spacing_mm:
        where = int(np.argmax(gaps))
        raise UnusableContentError(label, f"slices missing: a gap of {gaps.max():.2f} mm after sorted slice "
                                          f"{where + 1} of {len(slices)}, where slices are {spacing_mm:.2f} mm "
                                          f"apart (more than {MAX_GAP_FACTOR:g}x: not interpolated)")
    pixel_row, pixel_col = (float(v) for v in spacings[0])
    plan = GridPlan(order, (spacing_mm, pixel_row, pixel_col), _affine(row_dir, col_dir, normal, positions[0],
                                                                      spacing_mm, pixel_row, pixel_col))
    _plan_tilt(plan, positions, heights, normal, row_dir, col_dir, label)
    if np.abs(gaps - spacing_mm).max() > tolerance:
        count = round((heights[-1] - heights[0]) / spacing_mm) + 1
        targets = heights[0] + spacing_mm * np.arange(count)
        lower = np.clip(np.searchsorted(heights, targets + tolerance, side="right") - 1, 0, len(heights) - 2)
        weight = np.clip((targets - heights[lower]) / (heights[lower + 1] - heights[lower]), 0.0, 1.0)
        weight[np.abs(weight) * gaps[lower] < tolerance] = 0.0  # on a source slice: take it as is
        plan.lower, plan.weight = lower, weight
        plan.notes.append(f"uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): resampled along the "
                          f"patient axis to a uniform {spacing_mm:.2f} mm grid ({len(slices)} -> {count} slices, "
                          "linear interpolation)")
    return plan


def _plan_tilt(plan: GridPlan, positions, heights, normal, row_dir, col_dir, label: str) -> None:
    drift = positions - positions[0] - np.outer(heights - heights[0], normal)
    along_rows = drift @ col_dir / plan.spacing[1]  # pixels, in the direction of increasing row index
    along_cols = drift @ row_dir / plan.spacing[2]
    if max(np.abs(along_rows).max(), np.abs(along_cols).max()) <= 0.01:
        return
    plan.inplane_shift = np.stack([along_rows, along_cols], axis=1)
    span = float(heights[-1] - heights[0])
    shift_mm = float(np.linalg.norm(drift[-1]))
    angle = math.degrees(math.atan2(shift_mm, span)) if span > 0 else 90.0
    if angle >= 45.0:
        raise UnusableContentError(label, f"the slice origins move {shift_mm:.1f} mm within the slice plane over "
                                          f"{span:.1f} mm along it: not a volume")
    plan.notes.append(f"gantry tilt (or sheared stack) of {angle:.1f} degrees: slices shifted in-plane onto an "
                      "orthogonal grid (linear interpolation, air outside the scanned field)")


def _unit(vector: np.ndarray, label: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm < 1e-6:
        raise UnusableContentError(label, "ImageOrientationPatient is missing or degenerate")
    return vector / norm


def _affine(row_dir, col_dir, normal, origin, spacing_mm, pixel_row, pixel_col) -> np.ndarray:
    """Voxel (col, row, slice) -> RAS mm. DICOM's patient space is LPS; the chain's affines are RAS."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_col  # the row direction cosine: along increasing column index
    lps[:3, 1] = col_dir * pixel_row
    lps[:3, 2] = normal * spacing_mm
    lps[:3, 3] = origin
    ras = np.eye(4)
    ras[:3, :] = LPS_TO_RAS @ lps[:3, :]
    return ras


def resample(slices: np.ndarray, plan: GridPlan) -> np.ndarray:
    """Sorted float32 HU slices -> the plan's uniform grid (in-plane shift first, then along the normal)."""
    if plan.inplane_shift is not None:
        for k, shift in enumerate(plan.inplane_shift):
            slices[k] = shifted(slices[k], shift)
    if plan.lower is None:
        return slices
    out = np.empty((len(plan.lower), *slices.shape[1:]), dtype=np.float32)
    for k in range(len(plan.lower)):
        out[k] = grid_slice(plan, k, slices.__getitem__)
    return out


def shifted(plane: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A sorted float32 slice moved by its in-plane `shift` (row, col pixels) onto the first slice's grid."""
    if np.abs(shift).max() <= 0.01:
        return plane
    from scipy import ndimage

    return ndimage.shift(plane, shift, order=1, mode="constant", cval=float(HU_MIN), prefilter=False)


def grid_slice(plan: GridPlan, k: int, sorted_slice) -> np.ndarray:
    """Output slice `k` of the grid from `sorted_slice(i)` (the i-th sorted slice, float32, shifted)."""
    if plan.lower is None:
        return sorted_slice(k)
    i, w = plan.lower[k], plan.weight[k]
    if w == 0.0:
        return sorted_slice(i)
    return ((1.0 - w) * sorted_slice(i) + w * sorted_slice(i + 1)).astype(np.float32, copy=False)
