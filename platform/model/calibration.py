"""Per-class probability calibration as shipped in a model bundle: two numbers per class, plain JSON.

The transform is monotone increasing per class (slope > 0)::

    calibrated = sigmoid(slope * logit(clip(p, eps, 1 - eps)) + intercept)

so the predictor applies exactly the same function wherever a bundle is used, and the bundle needs no pickle. It
changes the decisions at ``p >= 0.5`` and never the order of the cases, hence never the AUROC: strictly increasing
in exact arithmetic, and in float64 wherever the result does not round to 0 or 1 and ``p`` lies inside the clip.
The clip is ``eps = 1e-15`` (bundles written before it was stored used 1e-6, which tied every probability below
1e-6). Fitting it on validation is evaluation's job (``ctplatform.evaluation.calibration``); this module is the
format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

PROB_EPS = 1e-15
# The clip of bundles whose calibration does not say which it used.
LEGACY_PROB_EPS = 1e-6

METHOD_IDENTITY = "identity"
METHOD_PLATT_F1 = "platt+f1-threshold"


def logit(p: np.ndarray, eps: float = PROB_EPS) -> np.ndarray:
    """log(p / (1 − p)) after clipping to [eps, 1 − eps], in float64 (0 and 1 stay finite)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    exp_x = np.exp(x[~positive])
    out[~positive] = exp_x / (1.0 + exp_x)
    return out


@dataclass
class Calibration:
    """Per-class affine map in logit space: ``sigmoid(slope * logit(p, clip) + intercept)``, class axis last."""

    slope: np.ndarray
    intercept: np.ndarray
    method: str = METHOD_PLATT_F1
    clip: float = PROB_EPS

    def __post_init__(self) -> None:
        self.slope = np.asarray(self.slope, dtype=np.float64).reshape(-1)
        self.intercept = np.asarray(self.intercept, dtype=np.float64).reshape(-1)
        if self.slope.shape != self.intercept.shape:
            raise ValueError(
                f"slope has {self.slope.size} classes but intercept has {self.intercept.size}"
            )
        if not (np.isfinite(self.slope).all() and np.isfinite(self.intercept).all()):
            raise ValueError("calibration slope and intercept must be finite")
        if (self.slope <= 0).any():
            # A non-positive slope would reorder (or tie) the cases and change AUROC.
            raise ValueError("calibration slopes must be > 0 so the transform is monotone increasing")
        if not 0.0 < self.clip < 0.5:
            raise ValueError(f"calibration clip must lie in (0, 0.5), got {self.clip}")

    @property
    def num_classes(self) -> int:
        return int(self.slope.size)

    @classmethod
    def identity(cls, num_classes: int) -> Calibration:
        """No-op calibration (up to the clip): slope 1, intercept 0 for every class."""
        return cls(np.ones(num_classes), np.zeros(num_classes), METHOD_IDENTITY)

    def apply(self, probs: Any) -> np.ndarray:
        """Calibrate probabilities of shape (..., C); returns float64 of the same shape."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim == 0 or probs.shape[-1] != self.num_classes:
            raise ValueError(
                f"probs must have {self.num_classes} classes on the last axis, got shape {probs.shape}"
            )
        if not np.isfinite(probs).all():
            raise ValueError("probs contain NaN/inf")
        return sigmoid(self.slope * logit(probs, self.clip) + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists of floats), for the model bundle's metadata."""
        return {
            "method": self.method,
            "formula": "sigmoid(slope * logit(clip(p, eps, 1 - eps)) + intercept)",
            "clip": float(self.clip),
            "slope": [float(v) for v in self.slope],
            "intercept": [float(v) for v in self.intercept],
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Calibration:
        missing = [key for key in ("slope", "intercept", "method") if key not in payload]
        if missing:
            raise ValueError(f"calibration dict lacks {missing}")
        return cls(np.asarray(payload["slope"]), np.asarray(payload["intercept"]), str(payload["method"]),
                   float(payload.get("clip", LEGACY_PROB_EPS)))
