"""Patient-level splits: both reconstructions (and every scan) of a patient land on one side.

CT-RATE's two reconstructions of a scan share one label row; splitting by volume leaks validation data.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ctplatform.data.paths import parse_volume_name


def patient_of(volume_name: str) -> str:
    """`train_12_a_2.nii.gz` -> `train_12`; a name of another form is its own patient."""
    ident = parse_volume_name(volume_name)
    return ident.patient if ident is not None else volume_name


def patient_split(
    volume_names: Iterable[str], valid_fraction: float = 0.2, seed: int = 0
) -> dict[str, str]:
    """Assign each volume to "train" or "valid" by patient; deterministic for a seed.

    At least one patient goes to each side when there are two or more patients.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    names = list(volume_names)
    patients = sorted({patient_of(n) for n in names})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_valid = round(len(patients) * valid_fraction)
    if len(patients) >= 2:
        n_valid = min(max(n_valid, 1), len(patients) - 1)
    valid_patients = {patients[i] for i in order[:n_valid]}
    return {n: ("valid" if patient_of(n) in valid_patients else "train") for n in names}
