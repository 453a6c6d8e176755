"""How each of the 18 CT-RATE findings is drawn into the synthetic chest.

Each finding is local and placed where it occurs in real scans, spanning a contiguous range of slices, so a slice
classifier can learn it while global intensity statistics (a histogram) reveal little. A finding's function draws
it from its own random stream `r` into a :class:`~ctplatform.data.synthetic.anatomy.Chest`, which calls it
(through ``DRAW``) at the point of its drawing where the finding belongs. Two findings change the anatomy itself
rather than paint over it: cardiomegaly (a larger heart, whose myocardium is then the finding's voxels) and
pericardial effusion (a fluid layer that widens the pericardium).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ctplatform.data.synthetic.canvas import height_above_back, profile, rho2, segment_dist2, zrange

if TYPE_CHECKING:
    from ctplatform.data.synthetic.anatomy import Chest


# ------------------------------------------------------------------------------------- lung parenchyma
def mosaic_attenuation(ch: Chest, r: np.random.Generator) -> None:
    """Patchy lung density: alternating denser and lucent regions over a range of slices."""
    c = ch.c
    z0, z1 = zrange(r, 0.1, 0.95)
    ks = c.ks(z0, z1)
    field_ = np.zeros((c.size[0], c.size[1], 1), np.float32)
    for _ in range(3):
        k, th, ph = r.uniform(9, 14), r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
        field_ = field_ + np.cos(k * (c.u * np.cos(th) + c.v * np.sin(th)) + ph)
    field_ = field_ + 0.8 * np.cos(r.uniform(10, 20) * c.zs(ks) + r.uniform(0, 6))
    lung = ch.lungs.mask[:, :, ks]
    c.paint(lung & (field_ > 0), r.uniform(-760, -740), ks)
    c.paint(lung & (field_ <= 0), r.uniform(-905, -890), ks)


def emphysema(ch: Chest, r: np.random.Generator) -> None:
    """Centrilobular holes, clustered, in the upper lobes."""
    c = ch.c
    z0, z1 = zrange(r, 0.55, ch.z_apex)
    clusters = [ch.lungs.point(r, z0, z1, 0.1) for _ in range(r.integers(2, 4))]
    for _ in range(r.integers(18, 30)):
        cu_, cv_, _, _ = clusters[r.integers(len(clusters))]
        pu, pv, zc = cu_ + r.normal(0, 0.07), cv_ + r.normal(0, 0.07), r.uniform(z0, z1)
        rad, hz = r.uniform(0.05, 0.08), r.uniform(0.04, 0.07)
        ks = c.ks(zc - hz, zc + hz)
        rr = rad * profile(c.zs(ks), zc - hz, zc + hz, 2)
        hole = ((c.u - pu) ** 2 + (c.v - pv) ** 2 <= rr**2) & ch.lungs.mask[:, :, ks]
        c.paint(hole, r.uniform(-1000, -985), ks)


def _lobules(ch: Chest, r, pu, pv, ks: slice, prof, spread: float, ra: tuple, rb: tuple) -> np.ndarray:
    """2-3 overlapping ellipses around (pu, pv), radii scaled per slice by `prof`: a lobulated airspace
    process (opacity, consolidation) over the slices `ks`."""
    c = ch.c
    mask = np.zeros(ch.lungs.mask[:, :, ks].shape, bool)
    for _ in range(r.integers(2, 4)):
        du, dv = r.uniform(-spread, spread, 2)
        a, b = r.uniform(*ra), r.uniform(*rb)
        mask |= rho2(c.u, c.v, pu + du, pv + dv, a * prof + 1e-3, b * prof + 1e-3) <= 1
    return mask


def lung_opacity(ch: Chest, r: np.random.Generator) -> None:
    """A lobulated ground-glass patch."""
    c = ch.c
    z0, z1 = zrange(r, 0.15, 0.95)
    pu, pv, _, _ = ch.lungs.point(r, z0 + 0.3 * (z1 - z0), z1 - 0.3 * (z1 - z0), 0.1)
    ks = c.ks(z0, z1)
    prof = profile(c.zs(ks), z0, z1, 2.5)
    mask = _lobules(ch, r, pu, pv, ks, prof, 0.08, (0.15, 0.22), (0.12, 0.18))
    c.paint(mask & ch.lungs.mask[:, :, ks], r.uniform(-600, -500), ks)


# ------------------------------------------------------------------------------------- airways
def _airways(ch: Chest, r: np.random.Generator, count, lumen_r, wall_r, wall_hu, zone) -> None:
    """Bronchi of lumen radius `lumen_r` with walls `wall_r` thick, within `zone` of heights, often on one side."""
    c = ch.c
    z0, z1 = zrange(r, *zone)
    side = int(r.choice((-1, 1))) if r.random() < 0.6 else None
    ks = c.ks(z0, z1)
    for _ in range(r.integers(*count)):
        pu, pv, zc, _ = ch.lungs.point(r, z0, z1, 0.08, side=side)
        tu, tv = c.tube(ks, pu, pv, zc, *r.uniform(-0.15, 0.15, 2))
        d2 = (c.u - tu) ** 2 + (c.v - tv) ** 2
        lumen = r.uniform(*lumen_r)
        wall = r.uniform(*wall_r)
        lung = ch.lungs.mask[:, :, ks]
        c.paint((d2 <= (lumen + wall) ** 2) & lung, r.uniform(*wall_hu), ks)
        c.paint((d2 <= lumen**2) & lung, -1000, ks)


def peribronchial_thickening(ch: Chest, r: np.random.Generator) -> None:
    """Many small bronchi with thick walls."""
    _airways(ch, r, (8, 14), (0.025, 0.032), (0.05, 0.06), (-120, -40), (0.2, 0.8))


def bronchiectasis(ch: Chest, r: np.random.Generator) -> None:
    """A few dilated bronchi, lower in the lungs."""
    _airways(ch, r, (4, 8), (0.08, 0.1), (0.03, 0.035), (0, 40), (0.08, 0.7))


# ------------------------------------------------------------------------------------- heart and mediastinum
def cardiomegaly_scale(r: np.random.Generator) -> tuple[float, float]:
    """Cardiomegaly: the factors on the heart's radius and height (its myocardium is the finding's voxels)."""
    return r.uniform(1.3, 1.4), 1.12


def pericardial_effusion_thickness(r: np.random.Generator) -> float:
    """Pericardial effusion: the fluid layer's thickness, by which the pericardium widens."""
    return r.uniform(0.07, 0.1)


def pericardial_effusion(ch: Chest, r: np.random.Generator) -> None:
    """Fluid between the pericardium and the epicardial fat."""
    ch.c.paint(ch.heart_mask(ch.epi_t + ch.peri_t), r.uniform(5, 15))


def coronary_calcification(ch: Chest, r: np.random.Generator) -> None:
    """Dense dots along the coronary arteries on the heart's anterior / left surface."""
    c, (hu0, hv0), rz = ch.c, ch.heart_c, ch.heart_rz
    z0, z1 = zrange(r, ch.heart_z[0] + 0.05, ch.heart_z[1], (0.15, 0.3))
    ks = c.ks(z0, z1)
    zs = c.zs(ks)
    for _ in range(r.integers(2, 4)):
        phi0 = r.uniform(-2.6, -0.2)  # anterior / left surface (LAD, LCx), -pi/2 is anterior
        phi = phi0 + r.uniform(-1.5, 1.5) * (zs - z0)
        rad = rz[:, :, ks] * 0.93
        pu, pv = hu0 + rad * np.cos(phi), hv0 + 0.85 * rad * np.sin(phi)
        dot = (c.u - pu) ** 2 + (c.v - pv) ** 2 <= r.uniform(0.04, 0.055) ** 2
        c.paint(dot & (rz[:, :, ks] > 0.05), r.uniform(600, 1200), ks)


def arterial_calcification(ch: Chest, r: np.random.Generator) -> None:
    """Calcified plaques: arcs in the wall of the descending (and often the ascending) aorta and its arch."""
    c = ch.c
    z0, z1 = zrange(r, 0.15, ch.z_arch + 0.03)
    ks = c.ks(z0, z1)
    for centre, radius in ((ch.desc, ch.aorta_r), (ch.asc, ch.aorta_r * 1.15)):
        if centre is ch.asc and r.random() < 0.5:
            continue
        a0 = r.uniform(-np.pi, np.pi)
        width = r.uniform(1.5, 2.8)
        ang = np.arctan2(c.v - centre[1], c.u - centre[0])
        dang = np.angle(np.exp(1j * (ang - a0)))
        d2 = (c.u - centre[0]) ** 2 + (c.v - centre[1]) ** 2
        arc = (d2 >= (radius - 0.04) ** 2) & (d2 <= (radius + 0.012) ** 2) & (np.abs(dang) < width / 2)
        kk = ks if centre is ch.desc else c.ks(max(z0, ch.heart_z[1] - 0.1), max(z1, ch.z_arch))
        c.paint(arc, r.uniform(700, 1400), kk)
    if z1 > ch.z_arch - 0.04:  # plaques on the arch too
        ka = c.ks(ch.z_arch - 0.04, ch.z_arch + 0.04)
        d2 = segment_dist2(c.u, c.v, ch.asc, ch.desc)
        rim = (d2 >= (ch.aorta_r - 0.03) ** 2) & (d2 <= (ch.aorta_r + 0.01) ** 2) & (c.v < ch.asc[1])
        c.paint(rim, r.uniform(700, 1400), ka)


def lymphadenopathy(ch: Chest, r: np.random.Generator) -> None:
    """Enlarged mediastinal lymph nodes at 2-3 of the chest's node stations."""
    c = ch.c
    z0, z1 = zrange(r, ch.z_carina - 0.2, ch.z_carina + 0.25)
    chosen = r.permutation(len(ch.node_sites))[: r.integers(2, 4)]
    for i in chosen:
        su, sv = ch.node_sites[i]
        ks = c.ks(z0, z1)
        rad = r.uniform(0.07, 0.09) * profile(c.zs(ks), z0, z1)
        c.paint((c.u - su) ** 2 + (c.v - sv) ** 2 <= rad**2, r.uniform(35, 50), ks)


def hiatal_hernia(ch: Chest, r: np.random.Generator) -> None:
    """Stomach above the diaphragm beside the esophagus, with an air-fluid level."""
    c = ch.c
    z0, z1 = zrange(r, ch.z_base, ch.heart_z[0] + 0.25, (0.15, 0.3))
    ks = c.ks(z0, z1)
    rad = r.uniform(0.14, 0.18) * profile(c.zs(ks), z0, z1)
    hu_, hv_ = ch.esoph[0] + 0.04, ch.esoph[1] - 0.08
    blob = (c.u - hu_) ** 2 + (c.v - hv_) ** 2 <= rad**2
    c.paint(blob, r.uniform(10, 30), ks)
    c.paint(blob & (c.v < hv_ - r.uniform(-0.02, 0.04)), -1000, ks)  # air-fluid level, air anterior


# ------------------------------------------------------------------------------------- dense lung findings
def septal_thickening(ch: Chest, r: np.random.Generator) -> None:
    """A fine grid of thickened interlobular septa in the subpleural lung."""
    c = ch.c
    z0, z1 = zrange(r, 0.1, 0.9)
    ks = c.ks(z0, z1)
    sp, th, off = r.uniform(0.11, 0.15), r.uniform(0, np.pi / 2), r.uniform(0, 1, 2)
    a = (c.u * np.cos(th) + c.v * np.sin(th)) / sp + off[0]
    b = (-c.u * np.sin(th) + c.v * np.cos(th)) / sp + off[1]
    w = 0.018 / sp
    grid = (np.abs(a - np.round(a)) < w) | (np.abs(b - np.round(b)) < w)
    c.paint(grid & ch.lungs.periphery(ks, 0.14), r.uniform(-330, -270), ks)


def fibrotic_sequela(ch: Chest, r: np.random.Generator) -> None:
    """Pulmonary fibrotic sequela: subpleural bands running from the pleura inward, in the lower lungs."""
    c = ch.c
    z0, z1 = zrange(r, 0.05, 0.55)
    ks = c.ks(z0, z1)
    zs = c.zs(ks)
    periph = ch.lungs.periphery(ks, 0.2)
    for _ in range(r.integers(8, 13)):
        # a band from the pleura inward: start near the edge, point toward the lung's middle
        pu, pv, zc, side = ch.lungs.point(r, z0, z1)
        edge = ch.lungs.periphery(c.ks(zc, zc + 0.01), 0.05)[:, :, 0]
        rows_, cols_ = np.nonzero(edge & ch.lungs.side_mask(side)[:, :, 0])
        if rows_.size:
            i = r.integers(rows_.size)
            pu = (cols_[i] + 0.5) / c.size[1] * 2 - 1
            pv = (rows_[i] + 0.5) / c.size[0] * 2 - 1
        lu, lv, _, _ = ch.lungs.ellipse(side, np.float32(zc))
        th = float(np.arctan2(lv - pv, lu - pu)) + r.uniform(-0.6, 0.6)
        length = r.uniform(0.18, 0.3)
        a = (pu, pv)
        b = (pu + length * np.cos(th), pv + length * np.sin(th))
        du, dv = r.uniform(-0.2, 0.2, 2)
        d2 = segment_dist2(c.u - du * (zs - zc), c.v - dv * (zs - zc), a, b)
        c.paint((d2 <= r.uniform(0.035, 0.045) ** 2) & periph, r.uniform(-150, -50), ks)


def consolidation(ch: Chest, r: np.random.Generator) -> None:
    """A lobulated patch of soft-tissue density with air bronchograms."""
    c = ch.c
    z0, z1 = zrange(r, 0.08, 0.85)
    pu, pv, _, _ = ch.lungs.point(r, z0 + 0.3 * (z1 - z0), z1 - 0.3 * (z1 - z0), 0.1)
    ks = c.ks(z0, z1)
    prof = profile(c.zs(ks), z0, z1, 3)
    mask = _lobules(ch, r, pu, pv, ks, prof, 0.06, (0.2, 0.27), (0.17, 0.23))
    mask &= ch.lungs.mask[:, :, ks]
    c.paint(mask, r.uniform(25, 45), ks)
    for _ in range(r.integers(2, 4)):  # air bronchograms
        th = r.uniform(0, 2 * np.pi)
        length = r.uniform(0.14, 0.2)
        a = (pu - 0.03 * np.cos(th), pv - 0.03 * np.sin(th))
        b = (pu + length * np.cos(th), pv + length * np.sin(th))
        c.paint((segment_dist2(c.u, c.v, a, b) <= 0.028**2) & mask, -950, ks)


def atelectasis(ch: Chest, r: np.random.Generator) -> None:
    """A tall wedge rising from the posterior (dependent) edge of a lower lobe: apex toward the hilum."""
    c = ch.c
    z0, z1 = zrange(r, 0.2, 0.7)
    ks = c.ks(z0, z1)
    zs = c.zs(ks)
    for side in (-1, 1) if r.random() < 0.35 else (int(r.choice((-1, 1))),):
        height = height_above_back(ch.lungs.mask[:, :, ks] & ch.lungs.side_mask(side))
        lu, _, au, _ = ch.lungs.ellipse(side, zs)
        u0 = lu + side * au * r.uniform(-0.2, 0.35)
        tent = np.clip(1 - np.abs(c.u - u0) / r.uniform(0.16, 0.22), 0, 1)
        peak = r.uniform(0.3, 0.4) * profile(zs, z0, z1, 3)
        c.paint(height < peak * tent, r.uniform(50, 70), ks)


def pleural_effusion(ch: Chest, r: np.random.Generator) -> None:
    """Dependent fluid: a layer of even depth along the whole posterior edge, deepest at the base."""
    c = ch.c
    z0, z1 = zrange(r, 0.0, 0.55)
    z0 = min(z0, r.uniform(0.0, 0.08))  # dependent fluid reaches the costophrenic recess
    ks = c.ks(z0, z1)
    zs = c.zs(ks)
    depth = r.uniform(0.14, 0.22) * np.clip((z1 - zs) / (z1 - z0) * 1.6, 0, 1)
    for side in (-1, 1) if r.random() < 0.5 else (int(r.choice((-1, 1))),):
        height = height_above_back(ch.lungs.mask[:, :, ks] & ch.lungs.side_mask(side))
        c.paint(height < depth, r.uniform(5, 15), ks)


def lung_nodule(ch: Chest, r: np.random.Generator) -> None:
    """A round soft-tissue nodule away from the lung's edge."""
    c = ch.c
    length = r.uniform(0.14, 0.2)
    pu, pv, zc, _ = ch.lungs.point(r, 0.2, 0.85, 0.16)
    z0, z1 = zc - length / 2, zc + length / 2
    ks = c.ks(z0, z1)
    rad = r.uniform(0.11, 0.14) * profile(c.zs(ks), z0, z1, 3)
    c.paint(((c.u - pu) ** 2 + (c.v - pv) ** 2 <= rad**2) & ch.lungs.mask[:, :, ks], r.uniform(30, 60), ks)


# ------------------------------------------------------------------------------------- devices
def medical_material(ch: Chest, r: np.random.Generator) -> None:
    """A port / pacemaker generator in the anterior chest wall, with its lead toward the mediastinum."""
    c = ch.c
    ba, bb = ch.body_axes
    z0, z1 = zrange(r, 0.35, 0.98)
    ks = c.ks(z0, z1)
    side = int(r.choice((-1, 1)))
    th = -np.pi / 2 + side * r.uniform(0.35, 0.7)
    bu, bv, _, _ = ch.body
    depth = ch.fat_t * 0.6 + 0.01
    ax = float(np.max(ba)) - depth
    ay = float(np.max(bb)) - depth
    pu, pv = bu + ax * np.cos(th), bv + ay * np.sin(th)
    prof = profile(c.zs(ks), z0, z1, 4)
    size = r.uniform(0.035, 0.05)
    body = rho2(c.u, c.v, pu, pv, size * 1.4 * prof + 1e-3, size * 0.7 * prof + 1e-3) <= 1
    c.paint(body, r.uniform(2200, 3100), ks)
    lead = (segment_dist2(c.u, c.v, (pu, pv), (ch.asc[0] - 0.13, ch.asc[1])) <= 0.016**2)
    c.paint(lead & (prof > 0.2), r.uniform(1200, 2200), ks)


# Finding name -> the function drawing it. Cardiomegaly has none: the chest draws its enlarged heart.
DRAW: dict[str, Callable[[Chest, np.random.Generator], None]] = {
    "Medical material": medical_material,
    "Arterial wall calcification": arterial_calcification,
    "Pericardial effusion": pericardial_effusion,
    "Coronary artery wall calcification": coronary_calcification,
    "Hiatal hernia": hiatal_hernia,
    "Lymphadenopathy": lymphadenopathy,
    "Emphysema": emphysema,
    "Atelectasis": atelectasis,
    "Lung nodule": lung_nodule,
    "Lung opacity": lung_opacity,
    "Pulmonary fibrotic sequela": fibrotic_sequela,
    "Pleural effusion": pleural_effusion,
    "Mosaic attenuation pattern": mosaic_attenuation,
    "Peribronchial thickening": peribronchial_thickening,
    "Consolidation": consolidation,
    "Bronchiectasis": bronchiectasis,
    "Interlobular septal thickening": septal_thickening,
}
