"""Who is in a synthetic data set: patients, their scans and reconstructions, train/valid split, storage tree
(original or `_fixed`) and findings.

As in CT-RATE, a patient may have a second scan ('b') and a scan a second reconstruction (2); every volume of a
patient shares the patient's split, tree and label row. Findings are drawn per patient, each independently at its
CT-RATE validation-set prevalence (or the preset's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ctplatform.data.synthetic.streams import LABELS, STRUCTURE, rng
from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE

_SECOND_SCAN_P = 0.15  # patients with a scan 'b'
_SECOND_RECON_P = 1 / 3  # scans with a second reconstruction


@dataclass(frozen=True)
class Volume:
    """One volume of the data set: a reconstruction of a patient's scan."""

    split: str  # "train" | "valid"
    patient: int  # 1-based number within the split
    key: int  # global patient index: the random streams' key
    scan: str  # "a", "b"
    scan_index: int
    recon: int  # 1, 2
    fixed: bool  # stored in the `_fixed` tree
    labels: tuple[int, ...]  # 0/1 per finding, in CLASS_NAMES order

    @property
    def stem(self) -> str:
        return f"{self.split}_{self.patient}_{self.scan}_{self.recon}"

    @property
    def name(self) -> str:
        return self.stem + ".nii.gz"


def _bresenham(index: int, fraction: float) -> bool:
    """True for about `fraction` of consecutive indices, evenly spread; a prefix keeps its choices."""
    return math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


def plan_volumes(num_volumes: int, seed: int, valid_fraction: float, fixed_fraction: float,
                 prevalence: tuple[float, ...] | None = None) -> list[Volume]:
    """The data set's volumes, a patient's scans and reconstructions consecutive. Patient k's content depends only
    on (seed, k). `prevalence`: each finding's probability, in CLASS_NAMES order (default: CT-RATE's)."""
    cap = max(1, num_volumes // 3)  # at least 3 patients even for tiny data sets
    patients: list[list[tuple[str, int, int]]] = []
    total = 0
    while total < num_volumes:
        stream = rng(seed, STRUCTURE, len(patients))
        n_scans = 2 if stream.random() < _SECOND_SCAN_P else 1
        items = []
        for s in range(n_scans):
            n_recons = 2 if stream.random() < _SECOND_RECON_P else 1
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
    volumes: list[Volume] = []
    counters = {"train": 0, "valid": 0}
    prevalence = np.array(prevalence if prevalence is not None else [VALID_PREVALENCE[c] for c in CLASS_NAMES])
    for k, items in enumerate(patients):
        split = splits[k]
        number = counters[split]
        counters[split] += 1
        fixed = _bresenham(number, fixed_fraction)
        labels = tuple(int(x) for x in rng(seed, LABELS, k).random(len(CLASS_NAMES)) < prevalence)
        volumes += [Volume(split, number + 1, k, scan, s, recon, fixed, labels) for scan, s, recon in items]
    return volumes
