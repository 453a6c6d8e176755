"""The synthetic data set's random streams: every draw comes from ``default_rng([seed, stream, key...])``.

A stream is named by what it draws (a patient's scans, labels, anatomy, noise, scanner metadata, demographics)
and keyed by the patient (and scan, reconstruction, finding), so a patient's content depends only on the seed and
the patient: the same whatever the other patients are, and whichever process draws it.
"""

from __future__ import annotations

import numpy as np

STRUCTURE, LABELS, ANATOMY, NOISE, META, PATIENT = range(6)


def rng(seed: int, *key: int) -> np.random.Generator:
    """The stream `key` (a stream name above, then patient, ...) of the data set with this seed."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *key])
