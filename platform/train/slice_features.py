"""Slice features of a frozen encoder, computed once per cache and encoder and kept on disk (`--mil-frozen-encoder`).

With the encoder fixed, attention-MIL training only fits the pooling and the linear head, which takes seconds on
precomputed embeddings; every trial of a sweep that shares the encoder (same weights, windows and cache) reuses
one feature file instead of running the backbone again. Features are float16, one row per cached slice, in the
cache's slice order, under ``<feature_dir>/<key>.npy`` where the key hashes the encoder's weights, the input
windows and the cache's index. The file is written atomically, so concurrent writers (DDP ranks, trials) are safe:
the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ctplatform.atomic import write_atomic
from ctplatform.data.datasets import CacheIndex


def encoder_key(module: torch.nn.Module, *extra: str) -> str:
    """A content hash of a module's state (weights and buffers) plus any extra strings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def _index_fingerprint(index: CacheIndex) -> str:
    digest = hashlib.sha256()
    for name in ("index.parquet", "cache.json"):
        path = index.root / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_slice_features(
    extract: Callable[[torch.Tensor], torch.Tensor],
    key: str,
    index: CacheIndex,
    feature_dir: str | Path | None = None,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Per volume row of ``index``, the features ``(num_slices, D)`` of its cached slices.

    ``extract`` maps int16 HU slices ``(N, S, S)`` (on the CPU) to features ``(N, D)``; ``key`` names the encoder
    (see :func:`encoder_key`). Reads ``<feature_dir>/<key>-<index fingerprint>.npy`` when present, else computes
    and writes it (``feature_dir`` defaults to ``<cache>/mil_features``; an unwritable folder only costs a warning).
    """
    folder = Path(feature_dir) if feature_dir is not None else index.root / "mil_features"
    path = folder / f"{key}-{_index_fingerprint(index)}.npy"
    counts = index.volumes["num_slices"].to_numpy(dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    features = _read(path, int(offsets[-1]))
    if features is None:
        features = _compute(extract, index, batch_size)
        _write(path, features)
    return [features[offsets[r] : offsets[r + 1]] for r in range(len(counts))]


def _read(path: Path, rows: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None
    return features if features.ndim == 2 and features.shape[0] == rows else None


@torch.inference_mode()
def _compute(extract: Callable[[torch.Tensor], torch.Tensor], index: CacheIndex, batch_size: int) -> np.ndarray:
    parts = []
    for relative in index.files:
        volume = np.load(index.local_file(relative), mmap_mode="r", allow_pickle=False)
        for start in range(0, len(volume), batch_size):
            hu = torch.from_numpy(np.array(volume[start : start + batch_size], dtype=np.int16))
            parts.append(extract(hu).float().cpu().numpy().astype(np.float16))
    return np.concatenate(parts)


def _write(path: Path, features: np.ndarray) -> None:
    try:
        write_atomic(path, lambda handle: np.save(handle, features, allow_pickle=False))
    except OSError as exc:
        warnings.warn(f"could not cache slice features at {path} ({exc}); they stay in memory for this run",
                      stacklevel=3)
