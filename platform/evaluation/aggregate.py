"""Slice -> volume aggregation of probabilities (a slice head is trained on its volume's labels).

`mean` is robust to single-slice noise, `max` favours small focal findings (a nodule on 3 of 32 slices), `topk`
(mean of the k highest) sits between them. The challenge scores volumes, so this choice matters.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "max", "topk")


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
