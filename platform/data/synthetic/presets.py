"""How hard a synthetic data set is: the realistic preset (the default) or the easy one that `ctplatform demo` uses.

realistic: findings at their CT-RATE prevalence, each over the range of slices where it occurs in real scans, so a
volume label says little about most of a volume's slices. A model trained on volume labels from random weights
needs far more volumes than a laptop demo has (measured: macro AUROC ~0.5 with the demo's recipe).

easy: every patient has the same healthy chest; each finding is drawn where it belongs, then thickened by a few
voxels and copied (the slice where it is largest) into every slice at a density of its own; every finding is present
in a quarter of the patients. Every slice of a volume then shows all its findings (volume labels are slice labels)
and nothing but the findings differs between volumes. This is far easier than real CT: it exists so that the demo
visibly learns from random weights on a CPU (given enough volumes: benchmarks/demo_learnability.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE

# The easy preset's density of each finding (HU), one per finding, about 130 HU apart between air and the top of
# the bone window, as seen through the three input windows (lung [-1350, 150], mediastinum [-160, 240], bone
# [-500, 1300]); the normal lung (about -850) is left out of the ladder.
EASY_HU: dict[str, float] = dict(zip((
    "Emphysema", "Mosaic attenuation pattern", "Lung opacity", "Interlobular septal thickening", "Hiatal hernia",
    "Pulmonary fibrotic sequela", "Pericardial effusion", "Peribronchial thickening", "Lymphadenopathy",
    "Bronchiectasis", "Cardiomegaly", "Consolidation", "Atelectasis", "Pleural effusion", "Lung nodule",
    "Arterial wall calcification", "Coronary artery wall calcification", "Medical material"),
    (-1000, -700, -580, -460, -340, -220, -150, -50, 40, 110, 180, 300, 430, 560, 700, 850, 1050, 1300), strict=True))


@dataclass(frozen=True)
class Preset:
    name: str
    prevalence: tuple[float, ...]  # per finding, in CLASS_NAMES order
    extrude: bool  # copy each finding's largest slice into every slice of the scan
    finding_hu: dict[str, float] | None = None  # with `extrude`: each finding's voxels set to this density
    same_chest: bool = False  # every scan drawn on the same healthy chest (no variation between patients)
    thicken: float = 0.0  # with `extrude`: each finding grown by this fraction of the width (at least a voxel)


REALISTIC = Preset("realistic", tuple(VALID_PREVALENCE[c] for c in CLASS_NAMES), extrude=False)
EASY = Preset("easy", (1 / 4,) * len(CLASS_NAMES), extrude=True, finding_hu=EASY_HU, same_chest=True,
              thicken=1 / 32)
PRESETS = {p.name: p for p in (REALISTIC, EASY)}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {name!r}: choose one of {', '.join(PRESETS)}") from None
