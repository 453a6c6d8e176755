"""The lungs of the synthetic chest: their shape and voxels, normal tissue, vessels and airways, and places in
them where vessels and findings are drawn."""

from __future__ import annotations

import numpy as np

from ctplatform.data.synthetic.canvas import Canvas, erode


def taper(z):
    """How much narrower the chest is at height z: the upper chest narrows slightly."""
    return 1 - 0.06 * np.clip((z - 0.75) / 0.25, 0, 1)


class Lungs:
    """Both lungs within the thoracic cavity `cavity` (centre u, v; semi-axes u, v at its widest). `mask` (their
    voxels) is filled in by the chest, and must be final before the first query of places in it."""

    def __init__(self, canvas: Canvas, cavity: tuple, scale: float, z_apex: float):
        self.c = canvas
        self.cavity = cavity
        self.scale = scale
        self.z_apex = z_apex
        self.mask = np.zeros(canvas.size, bool)
        self._eroded: dict[int, np.ndarray] = {}

    def ellipse(self, side: int, z):
        """The in-plane ellipse (centre u, v; semi-axes u, v) of lung `side` (-1 right, +1 left) at height z."""
        cu, cv, ca, cb = self.cavity
        ca, cb = ca * taper(z), cb * taper(z)
        s = self.scale
        apex = np.sqrt(np.clip((self.z_apex - z) / 0.3, 0, 1))  # smaller toward the apex
        au = ca * (0.46 * s if side > 0 else 0.5 * s) * (0.35 + 0.65 * apex)
        av = cb * 0.86 * s * (0.4 + 0.6 * apex)
        lu = cu + side * ca * 0.47
        lv = cv + cb * 0.04 + (1 - apex) * cb * 0.1
        return lu, lv, au, av

    def side_mask(self, side: int):
        """The half of the chest of lung `side` (-1: patient right, low u; +1: patient left)."""
        return (self.c.u - self.cavity[0]) * side > 0

    def _inner(self, margin: float) -> np.ndarray:
        """Lung voxels at least `margin` (normalised units) from the lung's edge, in-plane."""
        steps = int(round(margin * min(self.c.size[:2]) / 2))  # noqa: RUF046 (numpy scalars round to floats)
        if steps not in self._eroded:
            self._eroded[steps] = erode(self.mask, steps)
        return self._eroded[steps]

    def point(self, r: np.random.Generator, zlo: float, zhi: float, margin: float = 0.0, side=None):
        """A random (u, v, z, side) in the lung, at least `margin` from its edge, at height in [zlo, zhi]."""
        c = self.c
        ks = c.ks(zlo, zhi)
        rows, cols, _ = c.size
        for m in (margin, margin / 2, 0.0):
            mask = self._inner(m)[:, :, ks]
            if side is not None:
                mask = mask & self.side_mask(side)
            flat = np.flatnonzero(mask)
            if flat.size:
                break
        else:  # no lung in that range: the middle of the requested lung
            s = side or 1
            lu, lv, _, _ = self.ellipse(s, np.float32((zlo + zhi) / 2))
            return float(lu), float(lv), (zlo + zhi) / 2, s
        row, col, k = np.unravel_index(flat[r.integers(flat.size)], mask.shape)
        u = (col + r.uniform(0.25, 0.75)) / cols * 2 - 1
        v = (row + r.uniform(0.25, 0.75)) / rows * 2 - 1
        z = (ks.start + k + 0.5) / c.size[2]
        return float(u), float(v), float(z), (1 if u > self.cavity[0] else -1)

    def periphery(self, ks: slice, margin: float):
        """Subpleural lung: lung voxels of slab `ks` within `margin` of the lung's edge."""
        return self.mask[:, :, ks] & ~self._inner(margin)[:, :, ks]

    def tissue(self, hu: float, gradient: float) -> np.ndarray:
        """Lung parenchyma of density `hu`, up to `gradient` HU denser toward the back (dependent lung)."""
        c = self.c
        lv = self.cavity[1]
        grad = gradient * np.clip((c.v - lv) / self.cavity[3], -1, 1)
        return (hu + grad).astype(np.float32)

    def draw_vessels_and_airways(self, r: np.random.Generator, contrast: bool) -> None:
        """The normal lung's vessels (enhanced with `contrast`) and small airways, from the anatomy stream `r`."""
        c = self.c
        # vessels: thinner than a voxel at this resolution, so partial volume makes them faint (-450..-200 HU)
        vessel_hu = r.uniform(-250, -150) + (100 if contrast else 0)
        for _ in range(r.integers(15, 40)):
            pu, pv, zc, _ = self.point(r, 0.05, 0.95)
            h = r.uniform(0.08, 0.25)
            ks = c.ks(zc - h, zc + h)
            tu, tv = c.tube(ks, pu, pv, zc, *r.uniform(-0.4, 0.4, 2))
            rad = r.uniform(0.012, 0.025)
            mask = ((c.u - tu) ** 2 + (c.v - tv) ** 2 <= rad**2) & self.mask[:, :, ks]
            c.paint(mask, vessel_hu + r.uniform(-50, 50), ks)
        for _ in range(r.integers(2, 7)):  # small airways with thin walls
            pu, pv, zc, _ = self.point(r, 0.15, 0.85, 0.05)
            h = r.uniform(0.08, 0.2)
            ks = c.ks(zc - h, zc + h)
            tu, tv = c.tube(ks, pu, pv, zc, *r.uniform(-0.2, 0.2, 2))
            d2 = (c.u - tu) ** 2 + (c.v - tv) ** 2
            lumen = r.uniform(0.018, 0.03)
            c.paint((d2 <= (lumen + 0.012) ** 2) & self.mask[:, :, ks], -150, ks)
            c.paint((d2 <= lumen**2) & self.mask[:, :, ks], -1000, ks)
