"""Model outputs -> probabilities -> volume probabilities: the platform's one sigmoid and slice -> volume
aggregation (a slice head is trained on its volume's labels; its volume probability aggregates its slices').

`mean` is robust to single-slice noise, `max` favours small focal findings (a nodule on 3 of 32 slices), `topk`
(mean of the k highest) sits between them. The challenge scores volumes, so this choice matters. Probabilities are
aggregated, not logits. The predictor and the training validation both go through :func:`probabilities` and
:func:`aggregate_slices`, so a checkpoint's validation metric and its bundle's evaluation see the same numbers.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "max", "topk")


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits of any shape -> probabilities ``1 / (1 + exp(-x))`` in float64, without overflow for any finite x."""
    x = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def aggregate_slices(slice_probs: np.ndarray, method: str = "mean", k: int = 3) -> np.ndarray:
    """(K, C) slice probabilities of one volume -> (C,) volume probabilities."""
    if slice_probs.ndim != 2 or slice_probs.shape[0] == 0:
        raise ValueError(f"expected (slices, classes) with at least one slice, got {slice_probs.shape}")
    if method == "mean":
        return slice_probs.mean(axis=0)
    if method == "max":
        return slice_probs.max(axis=0)
    if method == "topk":
        k = min(k, slice_probs.shape[0])
        return np.sort(slice_probs, axis=0)[-k:].mean(axis=0)
    raise ValueError(f"invalid aggregation {method!r}: choose one of {', '.join(AGGREGATIONS)}")


def aggregate_by_volume(
    slice_probs: np.ndarray, volume_ids: np.ndarray, method: str = "mean", k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) slice probabilities with (M,) volume ids -> (sorted unique ids, (V, C) volume probabilities)."""
    order = np.argsort(volume_ids, kind="stable")
    ids, starts = np.unique(volume_ids[order], return_index=True)
    groups = np.split(slice_probs[order], starts[1:])
    return ids, np.stack([aggregate_slices(g, method, k) for g in groups])
