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
