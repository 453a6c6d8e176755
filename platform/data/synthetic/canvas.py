"""The drawing surface of the chest phantom: a HU volume with normalised coordinates, and the shapes drawn on it.

Shapes are boolean masks (or squared distances) over the canvas's broadcast coordinates u, v (in-plane) and z
(height), so one expression draws a structure on every slice at once.
"""

from __future__ import annotations

import numpy as np


class Canvas:
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
        """The heights z of slices `ks`."""
        return self.z[:, :, ks]

    def tube(self, ks: slice, pu: float, pv: float, zc: float, du: float, dv: float):
        """Per slice of `ks`, the centre of a straight tube through (pu, pv) at height zc, sloping (du, dv) per z."""
        zs = self.zs(ks)
        return pu + du * (zs - zc), pv + dv * (zs - zc)

    def paint(self, mask: np.ndarray, value, ks: slice = slice(None)) -> None:
        """Set the voxels of `mask` (broadcast over slices `ks`) to `value` (a number or a broadcastable array)."""
        sub = self.hu[:, :, ks]
        mask = np.broadcast_to(mask, sub.shape)
        if self.tally is not None:  # voxels painted per slice for the finding being drawn
            self.tally[ks] += mask.sum(axis=(0, 1))
        if np.ndim(value) == 0:
            np.putmask(sub, mask, np.float32(value))
        else:
            sub[mask] = np.broadcast_to(value, sub.shape)[mask]


def ellipse(u, v, cu, cv, au, av):
    """Inside the ellipse centred at (cu, cv) with semi-axes (au, av)."""
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1.0


def rho2(u, v, cu, cv, au, av):
    """Squared elliptic radius about (cu, cv) with semi-axes (au, av): 1 on the ellipse."""
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2


def segment_dist2(u, v, a: tuple[float, float], b: tuple[float, float]):
    """Squared in-plane distance to the segment a-b."""
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / max(du * du + dv * dv, 1e-9), 0.0, 1.0)
    return (u - a[0] - t * du) ** 2 + (v - a[1] - t * dv) ** 2


def profile(z, z0: float, z1: float, power: float = 4.0):
    """1 in the middle of [z0, z1], falling to 0 at its ends (flat-topped)."""
    t = (z - (z0 + z1) / 2) / max((z1 - z0) / 2, 1e-6)
    return np.sqrt(np.clip(1 - np.abs(t) ** power, 0, 1))


def zrange(rng: np.random.Generator, lo: float, hi: float, frac=(0.15, 0.4)) -> tuple[float, float]:
    """A random height range within [lo, hi], `frac` (a range) of the volume's height long, or all of [lo, hi]."""
    length = rng.uniform(*frac)
    if hi - lo <= length:
        return lo, hi
    start = rng.uniform(lo, hi - length)
    return start, start + length


def height_above_back(mask: np.ndarray) -> np.ndarray:
    """For each voxel of `mask`, its distance (normalised v) above the mask's posterior edge in its column."""
    rows = mask.shape[0]
    last = rows - 1 - np.argmax(mask[::-1], axis=0)  # lowest (most posterior) row per (col, slice)
    dist = (last[None] - np.arange(rows)[:, None, None]) * (2.0 / rows)
    return np.where(mask, dist, np.inf).astype(np.float32)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
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


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane binary dilation by `steps` voxels (4-neighbourhood, repeated) of a 2-D mask."""
    out = mask.copy()
    for _ in range(steps):
        prev = out.copy()
        out[1:] |= prev[:-1]
        out[:-1] |= prev[1:]
        out[:, 1:] |= prev[:, :-1]
        out[:, :-1] |= prev[:, 1:]
    return out
