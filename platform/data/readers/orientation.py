"""One canonical voxel order for every reader: (slices, rows, cols) = (S, A, R), axial slices along axis 0.

Voxels are reoriented from the file's affine to RAS, so NIfTI training data and `.mha` challenge inputs (LPS, ITK)
look the same to the model.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations


def to_canonical(data: np.ndarray, affine: np.ndarray | None, zooms, notes: list[str]):
    """Reorient (z, y, x) stored data to (S, A, R); returns (data, spacing (slice, row, col) in mm).

    `zooms` are the header's voxel sizes along the file's axes (x, y, z), used where the affine is unusable."""
    spacing_xyz = list(zooms)
    if affine is None or not np.all(np.isfinite(affine)):
        notes.append("affine is missing or NaN: orientation unknown, stored axis order taken as axial")
        return data, (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        notes.append("affine is degenerate: orientation unknown, stored axis order taken as axial")
        return data, (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    if int(ornt[2, 0]) != 2:
        axis = "LR" if int(ornt[2, 0]) == 0 else "AP"
        notes.append(f"non-axial acquisition (slices along the {axis} axis): reoriented to axial")
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    xyz = orientations.apply_orientation(data.transpose(2, 1, 0), transform)
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    reordered = [float(voxel_sizes[int(np.flatnonzero(transform[:, 0] == k)[0])]) for k in range(3)]
    return xyz.transpose(2, 1, 0), (reordered[2], reordered[1], reordered[0])


def canonical_flips(affine: np.ndarray | None) -> tuple[tuple[bool, bool, bool], tuple[float, float, float]] | None:
    """For stored (z, y, x) data whose canonical (S, A, R) order needs only flips, no axis swap: which axes to flip
    and the spacing (slice, row, col) in mm, as `to_canonical` would give; None for any other affine."""
    if affine is None or not np.all(np.isfinite(affine)):
        return None
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        return None
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    if [int(axis) for axis in transform[:, 0]] != [0, 1, 2]:
        return None
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    flip_x, flip_y, flip_z = (bool(sign < 0) for sign in transform[:, 1])
    return (flip_z, flip_y, flip_x), (float(voxel_sizes[2]), float(voxel_sizes[1]), float(voxel_sizes[0]))
