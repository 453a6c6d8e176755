"""The decision rule: a finding is called present when its probability is at least 0.5.

The official VLM3D Task 2 scorer decides every class at ``p >= 0.5`` (inclusive) for precision, recall, F1,
accuracy and the CRG score; a bundle's calibration moves each class's best cut onto that point. Kept apart from the
scoring (no scikit-learn here), so the service's ingress decides without loading it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DECISION_THRESHOLD = 0.5


def decide(probs: Any, threshold: float = DECISION_THRESHOLD) -> np.ndarray:
    """The decisions ``probs >= threshold``, a bool array of probs' shape."""
    return np.asarray(probs) >= threshold
