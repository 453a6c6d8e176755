"""The normal chest of the synthetic CT phantom, and the order in which a scan's findings are drawn into it.

A simple chest in plausible Hounsfield units (body, fat, muscle, lungs with vessels and airways, heart, aorta,
trachea, spine, ribs) with large nuisance variation between healthy scans (body and lung size, fat, bone density,
dense bone spots, contrast), into which the scan's findings (``findings``) are drawn.
"""

from __future__ import annotations

import numpy as np

from ctplatform.data.synthetic.canvas import Canvas, dilate, ellipse, profile, rho2, segment_dist2
from ctplatform.data.synthetic.findings import DRAW, cardiomegaly_scale, pericardial_effusion_thickness
from ctplatform.data.synthetic.lungs import Lungs, taper
from ctplatform.data.synthetic.presets import REALISTIC, Preset
from ctplatform.data.synthetic.size import check_size
from ctplatform.data.synthetic.streams import ANATOMY, rng
from ctplatform.labels import CLASS_NAMES


class Chest:
    """One scan's chest (shared by its reconstructions): normal anatomy with nuisance variation, and the scan's
    findings drawn into it (``findings.DRAW``) in an order where later structures cover earlier ones."""

    def __init__(self, size: tuple[int, int, int], labels: tuple[int, ...], seed: int, key: int, scan_index: int,
                 preset: Preset = REALISTIC):
        # Normal anatomy and each finding draw from their own streams: a scan's healthy anatomy does not depend
        # on its labels, and each finding is drawn the same whatever the others are.
        # (the easy preset gives every scan the same healthy chest: only the findings differ between scans)
        self.rng = r = rng(seed, ANATOMY, *((0, 0) if preset.same_chest else (key, scan_index)))
        self.fr = {name: rng(seed, ANATOMY, key, scan_index, 1 + i) for i, name in enumerate(CLASS_NAMES)}
        self.c = Canvas(size)
        self.has = dict(zip(CLASS_NAMES, (bool(x) for x in labels), strict=True))
        self.preset = preset  # the easy one extrudes each finding through the scan at a higher contrast
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
        lung_scale = r.uniform(0.85, 1.02)
        self.z_base = r.uniform(0.04, 0.14)  # diaphragm at the lateral recesses
        self.z_apex = r.uniform(0.9, 1.0)
        self.dome = r.uniform(0.12, 0.22)
        self.contrast = r.random() < 0.3
        self.blood_hu = r.uniform(140, 260) if self.contrast else r.uniform(35, 50)
        bu, bv, ba, bb = self.body
        self.body_axes = (ba * taper(z), bb * taper(z))
        inset = self.fat_t + self.muscle_t
        self.cav0 = (bu, bv, ba - inset, bb - inset)  # thoracic cavity at its widest
        self.cav = (bu, bv, self.body_axes[0] - inset, self.body_axes[1] - inset)
        self.spine_v = bv + (bb - inset) * 0.92
        self.keepout = np.zeros(self.c.size, bool)  # mediastinal structures the lung findings must not cover
        self.lungs = Lungs(self.c, self.cav0, lung_scale, self.z_apex)
        self.counts: dict[str, np.ndarray] = {}  # finding -> voxels painted per slice

    # ------------------------------------------------------------------------------------------- build
    def build(self) -> np.ndarray:
        """Draw the chest: the (rows, cols, slices) float32 HU volume."""
        self._body()
        self._lungs_masks()
        self._mediastinum_masks()
        self.lungs.mask &= ~self.keepout
        self.c.paint(self.lungs.mask, self.lungs.tissue(self.lung_hu, self.lung_gradient))
        for name in ("Mosaic attenuation pattern", "Emphysema", "Lung opacity"):  # vessels and airways cross these
            self._draw(name)
        self.lungs.draw_vessels_and_airways(self.rng, self.contrast)
        for name in ("Peribronchial thickening", "Bronchiectasis"):
            self._draw(name)
        self._heart()
        self._vessels_and_mediastinum()
        for name in ("Interlobular septal thickening", "Pulmonary fibrotic sequela", "Consolidation", "Atelectasis",
                     "Pleural effusion", "Lung nodule"):  # these cover the lung's vessels and airways
            self._draw(name)
        self._bones()
        self._draw("Medical material")
        return self.c.hu

    def _tally(self, name: str) -> np.ndarray:
        """The per-slice count of voxels painted for finding `name`."""
        return self.counts.setdefault(name, np.zeros(self.c.size[2], np.int64))

    def _draw(self, name: str) -> None:
        """Draw finding `name` if the scan has it, from its own random stream, counting the voxels it paints."""
        if self.has[name]:
            self._paint_finding(name, lambda: DRAW[name](self, self.fr[name]))

    def _paint_finding(self, name: str, draw) -> None:
        """Run `draw()`, counting the voxels it paints as finding `name`'s; with the preset's `extrude`, then copy
        the slice where the finding is largest (at the preset's density for it, if any) into every slice."""
        before = self.c.hu.copy() if self.preset.extrude else None
        self.c.tally = tally = self._tally(name)
        draw()
        self.c.tally = None
        if before is not None and tally.any():
            k = int(np.argmax(tally))
            plane = self.c.hu[:, :, k]
            changed = plane != before[:, :, k]
            if self.preset.thicken:  # thin findings (arcs, bands, small holes) made blobs a few voxels wide
                changed = dilate(changed, max(1, round(self.preset.thicken * self.c.size[1])))
            if self.preset.finding_hu is not None:
                plane[changed] = self.preset.finding_hu[name]
            self.c.hu[changed] = plane[changed][:, None]
            np.maximum(tally, int(changed.sum()), out=tally)

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
        c.paint(ellipse(c.u, c.v, bu, bv, ba, bb), self.fat_hu)
        c.paint(ellipse(c.u, c.v, bu, bv, ba - self.fat_t, bb - self.fat_t), self.muscle_hu)
        # subcutaneous fat strands / breast tissue vary the fat layer
        cu, cv, ca, cb = self.cav
        c.paint(ellipse(c.u, c.v, cu, cv, ca, cb), self.fat_hu + r.uniform(-10, 15))  # mediastinal fat
        # abdomen below the diaphragm (liver on the right, spleen/stomach on the left)
        z_d = self._diaphragm()
        below = ellipse(c.u, c.v, cu, cv, ca, cb) & (c.z < z_d)
        c.paint(below, np.where(c.u < cu + 0.1, r.uniform(50, 65), r.uniform(35, 50)).astype(np.float32))
        if r.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
            su, sv = cu + 0.35 * float(np.max(ca)), cv - 0.1
            k = c.ks(0.0, self.z_base + 0.08)
            bubble = ellipse(c.u, c.v, su, sv, 0.1, 0.07) & (c.v < sv) & below[:, :, k]
            c.paint(bubble, -1000, k)
        if r.random() < 0.5:  # reconstruction circle: scanners pad outside it with -1024
            c.paint(c.u**2 + c.v**2 > 1.0, -1024)

    def _diaphragm(self):
        c = self.c
        z_d = np.full((*c.size[:2], 1), self.z_base, np.float32)
        for side in (-1, 1):
            lu, lv, au, av = self.lungs.ellipse(side, np.float32(0.3))
            dome = self.dome * (1.1 if side < 0 else 0.9)  # right hemidiaphragm higher (liver)
            z_d = np.maximum(z_d, self.z_base + dome * np.clip(1 - rho2(c.u, c.v, lu, lv, au, av), 0, 1))
        return z_d

    def _lungs_masks(self) -> None:
        c = self.c
        cu, cv, ca, cb = self.cav
        cavity = ellipse(c.u, c.v, cu, cv, ca * 0.97, cb * 0.97)
        z_d = self._diaphragm()
        for side in (-1, 1):  # -1: patient right (low u), +1: patient left
            lu, lv, au, av = self.lungs.ellipse(side, c.z)
            mask = ellipse(c.u, c.v, lu, lv, au, av) & cavity & (c.z > z_d) & (c.z < self.z_apex)
            mask &= (c.u - cu) * side > 0.06  # the mediastinum separates the lungs
            self.lungs.mask |= mask

    # ------------------------------------------------------------------------------------------- mediastinum
    def _mediastinum_masks(self) -> None:
        c, r = self.c, self.rng
        cu, cv, ca, cb = self.cav0
        # heart: ellipsoid, anterior and to the left
        self.heart_r = r.uniform(0.2, 0.25)
        grow_r, grow_z = cardiomegaly_scale(self.fr["Cardiomegaly"]) if self.has["Cardiomegaly"] else (1.0, 1.0)
        self.heart_r *= grow_r
        self.heart_c = (cu + ca * 0.12 + 0.3 * (self.heart_r - 0.22), cv - cb * 0.15)
        hz = r.uniform(0.2, 0.24) * grow_z
        zc = self.z_base + self.dome * 0.6 + hz * 0.55
        self.heart_z = (zc - hz, zc + hz)
        pericardial = self.has["Pericardial effusion"]
        self.peri_t = pericardial_effusion_thickness(self.fr["Pericardial effusion"]) if pericardial else 0.0
        self.epi_t = r.uniform(0.025, 0.04)
        self.heart_rz = self.heart_r * profile(c.z, *self.heart_z, power=2.5)
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
        tu, tv = self.trachea  # mediastinal lymph node stations
        self.node_sites = [(tu - 0.1, tv - 0.02), (tu + 0.1, tv - 0.08), (tu, tv + 0.1), (tu - 0.06, tv - 0.14)]
        self.keepout |= self._aorta_mask(self.aorta_r + 0.02)
        self.keepout |= ellipse(c.u, c.v, *self.trachea, 0.09, 0.09) & (c.z > self.z_carina - 0.1)
        self.keepout |= ellipse(c.u, c.v, cu, self.spine_v, 0.15, 0.14)
        self.keepout |= ellipse(c.u, c.v, *self.esoph, 0.06, 0.06)
        # upper mediastinum between the lungs (fat with vessels)
        self.keepout |= ellipse(c.u, c.v, cu, cv - 0.1, 0.16, cb * 0.8) & (c.z > self.heart_z[1] - 0.05)

    def _aorta_mask(self, radius: float):
        c = self.c
        asc = ellipse(c.u, c.v, *self.asc, radius * 1.15, radius * 1.15) & (c.z > self.heart_z[1] - 0.12)
        asc &= c.z < self.z_arch
        desc = ellipse(c.u, c.v, *self.desc, radius, radius) & (c.z < self.z_arch)
        arch_d = segment_dist2(c.u, c.v, self.asc, self.desc)
        arch = (arch_d <= radius**2) & (np.abs(c.z - self.z_arch) < 0.045)
        return asc | desc | arch

    def heart_mask(self, extra: float) -> np.ndarray:
        """The heart grown by `extra` (normalised units; negative shrinks it), on the slices it is on."""
        c, (hu0, hv0), rz = self.c, self.heart_c, self.heart_rz
        return ((c.u - hu0) ** 2 + ((c.v - hv0) / 0.85) ** 2 <= (rz + extra) ** 2) & (rz > 0.02)

    def _heart(self) -> None:
        c, r = self.c, self.rng
        fat = self.fat_hu + r.uniform(0, 20)
        c.paint(self.heart_mask(self.epi_t * 2 + self.peri_t), fat)  # paracardiac fat
        if self.has["Pericardial effusion"]:
            self._draw("Pericardial effusion")
            c.paint(self.heart_mask(self.epi_t), fat)
        # the myocardium; an enlarged one (cardiomegaly_scale) is that finding's voxels
        myocardium = self.heart_mask(0.0), r.uniform(35, 48)
        if self.has["Cardiomegaly"]:
            self._paint_finding("Cardiomegaly", lambda: c.paint(*myocardium))
        else:
            c.paint(*myocardium)
        if self.contrast:  # enhanced ventricular cavity
            c.paint(self.heart_mask(-0.45 * self.heart_rz), self.blood_hu)
        self._draw("Coronary artery wall calcification")

    def _vessels_and_mediastinum(self) -> None:
        c, r = self.c, self.rng
        c.paint(self._aorta_mask(self.aorta_r), self.blood_hu)
        # pulmonary trunk and SVC
        k = c.ks(self.heart_z[1] - 0.08, self.heart_z[1] + 0.08)
        c.paint(ellipse(c.u, c.v, self.asc[0] + 0.14, self.asc[1] - 0.02, 0.08, 0.07), self.blood_hu, k)
        k = c.ks(self.heart_z[1] - 0.05, 0.95)
        c.paint(ellipse(c.u, c.v, self.asc[0] - 0.13, self.asc[1] + 0.02, 0.04, 0.045), self.blood_hu, k)
        self._draw("Arterial wall calcification")
        # esophagus (with a little air) and trachea / main bronchi
        c.paint(ellipse(c.u, c.v, *self.esoph, 0.04, 0.035), self.muscle_hu)
        if r.random() < 0.5:
            c.paint(ellipse(c.u, c.v, *self.esoph, 0.015, 0.015), -900)
        tu, tv = self.trachea
        kt = c.ks(self.z_carina, 1.0)
        tr = r.uniform(0.055, 0.07)
        c.paint(ellipse(c.u, c.v, tu, tv, tr + 0.015, tr + 0.015), self.muscle_hu, kt)
        c.paint(ellipse(c.u, c.v, tu, tv, tr, tr * 0.9), -1000, kt)
        kb = c.ks(self.z_carina - 0.12, self.z_carina)
        zb = c.zs(kb)
        spread = 0.05 + (self.z_carina - zb) * 1.2
        for side in (-1, 1):
            bu = tu + side * spread
            c.paint(ellipse(c.u, c.v, bu, tv + 0.02, 0.05, 0.05), self.muscle_hu, kb)
            c.paint(ellipse(c.u, c.v, bu, tv + 0.02, 0.036, 0.036), -1000, kb)
        for su, sv in self.node_sites:  # mediastinal lymph nodes: small in everyone, large with lymphadenopathy
            zc = r.uniform(self.z_carina - 0.1, self.z_carina + 0.15)
            ks = c.ks(zc - 0.04, zc + 0.04)
            c.paint(ellipse(c.u, c.v, su, sv, 0.025, 0.025), r.uniform(30, 45), ks)
        self._draw("Lymphadenopathy")
        self._draw("Hiatal hernia")

    # ------------------------------------------------------------------------------------------- bones
    def _bones(self) -> None:
        c, r = self.c, self.rng
        cu, cv, ca, cb = self.cav0
        bone = self.bone_hu
        sv = self.spine_v
        # vertebral body (cortex brighter), spinal canal, posterior elements
        c.paint(ellipse(c.u, c.v, cu, sv, 0.12, 0.1), bone * 1.5)
        c.paint(ellipse(c.u, c.v, cu, sv, 0.095, 0.075), bone)
        c.paint(ellipse(c.u, c.v, cu, sv + 0.15, 0.04, 0.04), self.muscle_hu - 20)
        c.paint(ellipse(c.u, c.v, cu, sv + 0.15, 0.11, 0.055) & ~ellipse(c.u, c.v, cu, sv + 0.15, 0.045, 0.045),
                bone * 1.3)
        c.paint(ellipse(c.u, c.v, cu, sv + 0.27, 0.025, 0.07), bone * 1.3)
        # sternum
        _ba, bb = self.body_axes
        st_v = self.body[1] - bb + self.fat_t + self.muscle_t * 0.5
        c.paint(ellipse(c.u, c.v, cu, st_v, 0.07, 0.03) & (c.z > 0.25), bone * 1.2)
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
            c.paint(ellipse(c.u, c.v, pu, pv, rad, rad * r.uniform(0.6, 1.4)), r.uniform(1600, 3100), ks)


def synthesize_scan(
    seed: int, key: int, scan_index: int, size: tuple[int, int, int], labels, preset: Preset = REALISTIC
) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Noise-free HU phantom of one scan: (rows, cols, slices) float32, and each finding's slice range.

    The ranges are (first, last) slice indices, inclusive, of the slices showing at least 3 voxels of the finding:
    ground truth that volume labels lack (for tests, and for checking slice-level models).
    """
    chest = Chest(check_size(tuple(size)), tuple(int(x) for x in labels), seed, key, scan_index, preset)
    return chest.build(), chest.extents()
