"""How hard a synthetic data set is: the realistic preset (the default) or the easy one that `ctplatform demo` uses.

realistic: findings at their CT-RATE prevalence, each over the range of slices where it occurs in real scans, so a
volume label says little about most of a volume's slices. A model trained on volume labels from random weights
needs far more volumes than a laptop demo has (measured: macro AUROC ~0.5 with the demo's recipe).

easy: the same chest and the same findings, but each finding is extruded through the whole scan (the slice where
it is largest, copied into every slice) and every finding is present in a third of the patients. Every slice of a
volume then shows all of its findings, so volume labels are slice labels, and each class has enough positives to
learn from and to score on. This is far easier than real CT; it exists so that the demo visibly learns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE

# The easy preset's density of each finding (HU): the lung findings, which overlap in place, each get their own;
# findings elsewhere share a density with a lung finding but not a place. Chosen apart from the normal chest's air
# (-1000), lung (about -850), fat (about -100), soft tissue (35-65), enhanced blood (140-260) and bone (350-900),
# and seen through the three input windows (lung [-1350, 150], mediastinum [-160, 240], bone [-500, 1300]).
EASY_HU: dict[str, float] = {
    "Emphysema": -1000, "Mosaic attenuation pattern": -650, "Lung opacity": -500,
    "Interlobular septal thickening": -350, "Pulmonary fibrotic sequela": -200, "Peribronchial thickening": -50,
    "Bronchiectasis": 100, "Consolidation": 300, "Atelectasis": 1000, "Pleural effusion": 1150, "Lung nodule": 1300,
    "Medical material": 3000, "Arterial wall calcification": 1150, "Coronary artery wall calcification": 1300,
    "Pericardial effusion": -350, "Lymphadenopathy": 300, "Hiatal hernia": -500, "Cardiomegaly": 100,
}


@dataclass(frozen=True)
class Preset:
    name: str
    prevalence: tuple[float, ...]  # per finding, in CLASS_NAMES order
    extrude: bool  # copy each finding's largest slice into every slice of the scan
    finding_hu: dict[str, float] | None = None  # with `extrude`: each finding's voxels set to this density


REALISTIC = Preset("realistic", tuple(VALID_PREVALENCE[c] for c in CLASS_NAMES), extrude=False)
EASY = Preset("easy", (1 / 3,) * len(CLASS_NAMES), extrude=True, finding_hu=EASY_HU)
PRESETS = {p.name: p for p in (REALISTIC, EASY)}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {name!r}: choose one of {', '.join(PRESETS)}") from None
