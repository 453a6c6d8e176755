"""PyTorch datasets over a prepared slice cache (or the legacy `slices/` + `splits/` layout).

Items are int16 HU tensors: conversion to float, windowing and augmentation run later on whole batches (on the
GPU in training), which keeps the loader's per-item work to one memory-mapped copy of S*S*2 bytes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ctplatform import storage
from ctplatform.data.errors import DataFormatError
from ctplatform.data.local_cache import NodeLocalCache
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.labels import CLASS_NAMES


@dataclass
class CacheIndex:
    """One row per volume (`volumes`) plus a flat table of slices (`slice_file`, `slice_in_file`, `slice_volume`)."""

    root: Path
    layout: str  # "cache" or "legacy"
    volumes: pd.DataFrame  # VolumeName, split, patient, labels (CLASS_NAMES columns)
    files: list[str]  # relative paths
    slice_file: np.ndarray  # (M,) index into files
    slice_in_file: np.ndarray  # (M,) slice within a 3-D file, -1 for a 2-D file
    slice_volume: np.ndarray  # (M,) row in volumes
    settings: PreprocessSettings | None
    source: NodeLocalCache | None = None  # a cache in object storage: its files are fetched to `root` on first use

    def local_file(self, relative: str) -> Path:
        """The local path of one of the cache's files (fetched first when the cache is in object storage)."""
        return self.source.path(relative) if self.source is not None else self.root / relative

    def labels(self) -> np.ndarray:
        return self.volumes[list(CLASS_NAMES)].to_numpy(dtype=np.float32)

    def split_volumes(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.volumes["split"] == split).to_numpy())


def load_cache_index(slice_dir: str | Path, local_cache_gb: float = 50.0) -> CacheIndex:
    """Open a prepared cache (index.parquet) or, failing that, the legacy layout (splits/*_slices.csv). A URI is
    read through a node-local copy of at most `local_cache_gb` GiB (`ctplatform.data.local_cache`)."""
    if storage.is_uri(str(slice_dir)):
        return _load_remote_index(str(slice_dir), local_cache_gb)
    root = Path(slice_dir)
    if (root / "index.parquet").is_file():
        frame = pd.read_parquet(root / "index.parquet")
        settings = PreprocessSettings.from_dict(json.loads((root / "cache.json").read_text())["preprocess"])
        counts = frame["num_slices"].to_numpy(dtype=np.int64)
        return CacheIndex(
            root=root,
            layout="cache",
            volumes=frame,
            files=frame["file"].tolist(),
            slice_file=np.repeat(np.arange(len(frame), dtype=np.int64), counts),
            slice_in_file=np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if len(frame) else
            np.zeros(0, np.int64),
            slice_volume=np.repeat(np.arange(len(frame), dtype=np.int64), counts),
            settings=settings,
        )
    split_files = sorted((root / "splits").glob("*_slices.csv"))
    if not split_files:
        raise DataFormatError(root, "no slice cache here: expected index.parquet (ctplatform prepare) "
                                    "or splits/{train,valid}_slices.csv (the legacy layout)")
    parts = []
    for path in split_files:
        part = pd.read_csv(path)
        missing = [c for c in ("slice_path", "VolumeName", *CLASS_NAMES) if c not in part.columns]
        if missing:
            raise DataFormatError(path, "missing column", column=missing[0])
        part["split"] = path.name[: -len("_slices.csv")]
        parts.append(part)
    slices = pd.concat(parts, ignore_index=True)
    volumes = slices.drop_duplicates("VolumeName").reset_index(drop=True)
    volumes = volumes[["VolumeName", "split", *CLASS_NAMES]].copy()
    from ctplatform.data.splits import patient_of

    volumes["patient"] = volumes["VolumeName"].map(patient_of)
    row_of = {name: i for i, name in enumerate(volumes["VolumeName"])}
    return CacheIndex(
        root=root,
        layout="legacy",
        volumes=volumes,
        files=slices["slice_path"].tolist(),
        slice_file=np.arange(len(slices), dtype=np.int64),
        slice_in_file=np.full(len(slices), -1, dtype=np.int64),
        slice_volume=slices["VolumeName"].map(row_of).to_numpy(dtype=np.int64),
        settings=None,
    )


def _load_remote_index(uri: str, local_cache_gb: float) -> CacheIndex:
    if not storage.is_file(storage.join(uri, "index.parquet")):
        raise DataFormatError(uri, "no slice cache here: expected index.parquet (ctplatform prepare; a cache in "
                                   "object storage must use prepare's layout, not the legacy one)")
    source = NodeLocalCache(uri, local_cache_gb)
    source.path("cache.json")
    index = load_cache_index(source.path("index.parquet").parent)
    index.source = source
    source.prefetch(index.files)  # the first epoch streams: files arrive ahead of the reads that need them
    return index


class _MappedFiles:
    """A small per-process LRU of memory-mapped .npy files (safe to pickle into DataLoader workers)."""

    def __init__(self, root: Path, capacity: int = 1024, source: NodeLocalCache | None = None):
        self.root, self.capacity, self.source = root, capacity, source
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def __getstate__(self):
        return {"root": self.root, "capacity": self.capacity, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["root"], state["capacity"], state.get("source"))

    def _open(self, relative: str) -> np.ndarray:
        if self.source is None:
            return np.load(self.root / relative, mmap_mode="r", allow_pickle=False)
        try:
            return np.load(self.source.path(relative), mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:  # evicted by another process between the check and the open
            return np.load(self.source.fetch(relative), mmap_mode="r", allow_pickle=False)

    def get(self, relative: str) -> np.ndarray:
        array = self._maps.get(relative)
        if array is None:
            array = self._open(relative)
            self._maps[relative] = array
            if len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(relative)
        return array


class SliceDataset(Dataset):
    """Every cached slice of one split; item = (int16 HU (S, S), volume labels float32 (C,), volume row, item).

    The item number lets a distributed evaluation drop the duplicates DistributedSampler pads ranks with."""

    def __init__(self, index: CacheIndex, split: str):
        self.index = index
        rows = set(index.split_volumes(split).tolist())
        if not rows:
            raise DataFormatError(index.root, f"no volumes of split {split!r} in the cache")
        self.items = np.flatnonzero(np.isin(index.slice_volume, list(rows)))
        self.labels = torch.tensor(index.labels())
        self.files = _MappedFiles(index.root, source=index.source)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        array = self.files.get(self.index.files[self.index.slice_file[item]])
        k = self.index.slice_in_file[item]
        image = torch.from_numpy(np.array(array[k] if k >= 0 else array, dtype=np.int16))
        volume = int(self.index.slice_volume[item])
        return image, self.labels[volume], volume, i


class VolumeDataset(Dataset):
    """Every cached volume of one split; item = (int16 HU (K, S, S), labels (C,), volume row). Cache layout only."""

    def __init__(self, index: CacheIndex, split: str):
        if index.layout != "cache":
            raise DataFormatError(index.root, "volume-level items need a prepared cache (ctplatform prepare)")
        self.index = index
        self.rows = index.split_volumes(split)
        self.labels = torch.tensor(index.labels())
        self.files = _MappedFiles(index.root, capacity=256, source=index.source)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        array = self.files.get(self.index.files[row])
        return torch.from_numpy(np.array(array, dtype=np.int16)), self.labels[row], row


def bag_positions(count: int, k: int | None, generator: torch.Generator | None = None) -> np.ndarray:
    """Which of a volume's ``count`` cached slices a bag of at most ``k`` slices uses (ascending indices).

    All of them when ``k`` is None or ``count <= k``; else one slice from each of ``k`` equal bins: the bin centres
    without a generator (evaluation), a random slice per bin with one (training: every epoch sees other slices
    with the same coverage of the body)."""
    if k is None or count <= k:
        return np.arange(count, dtype=np.int64)
    edges = np.arange(k + 1) * count / k
    offsets = np.full(k, 0.5) if generator is None else torch.rand(k, generator=generator).double().numpy()
    picks = np.floor(edges[:-1] + offsets * (edges[1:] - edges[:-1])).astype(np.int64)
    return np.clip(picks, 0, count - 1)


class SliceBagDataset(Dataset):
    """Every cached volume of one split as a bag of slices, for volume-level (attention-MIL) training.

    Item = (int16 HU (k, S, S), labels (C,), volume row, item, positions (k,) of the kept slices within the cached
    volume). ``slices_per_volume`` caps k (see :func:`bag_positions`); ``random_subsample`` draws the kept slices
    anew on every access (training) instead of taking the bin centres. Cache layout only."""

    def __init__(self, index: CacheIndex, split: str, slices_per_volume: int | None = None,
                 random_subsample: bool = False):
        if index.layout != "cache":
            raise DataFormatError(index.root, "volume-level items need a prepared cache (ctplatform prepare)")
        self.index = index
        self.rows = index.split_volumes(split)
        if not len(self.rows):
            raise DataFormatError(index.root, f"no volumes of split {split!r} in the cache")
        self.labels = torch.tensor(index.labels())
        self.counts = index.volumes["num_slices"].to_numpy(dtype=np.int64)
        self.slices_per_volume = slices_per_volume
        self.random_subsample = random_subsample
        self.files = _MappedFiles(index.root, capacity=256, source=index.source)

    def __len__(self) -> int:
        return len(self.rows)

    def max_slices(self) -> int:
        """The largest bag this dataset gives."""
        largest = int(self.counts[self.rows].max())
        return min(largest, self.slices_per_volume) if self.slices_per_volume else largest

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        array = self.files.get(self.index.files[row])
        # torch's default generator: seeded per DataLoader worker, and by seed_everything in the main process
        generator = torch.default_generator if self.random_subsample else None
        keep = bag_positions(len(array), self.slices_per_volume, generator)
        hu = torch.from_numpy(np.array(array[keep], dtype=np.int16))
        return hu, self.labels[row], row, i, torch.from_numpy(keep)


class FeatureBagDataset(Dataset):
    """Bags of precomputed slice features (a frozen encoder's embeddings): item as :class:`SliceBagDataset`, with
    float features (k, D) in place of HU slices. ``features[j]`` belongs to volume row ``rows[j]``."""

    def __init__(self, features: list[np.ndarray], rows: np.ndarray, labels: np.ndarray):
        if len(features) != len(rows):
            raise ValueError(f"{len(features)} feature bags for {len(rows)} volumes")
        self.features, self.rows = features, np.asarray(rows)
        self.labels = torch.tensor(np.array(labels, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        bag = torch.from_numpy(np.asarray(self.features[i], dtype=np.float32))
        row = int(self.rows[i])
        return bag, self.labels[row], row, i, torch.arange(len(bag))


def collate_bags(items: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Bags of different sizes -> (padded (B, Kmax, ...), mask (B, Kmax) bool, labels (B, C), rows (B,), items (B,),
    positions (B, Kmax) with -1 on padding). Padding is zeros; the mask marks the real slices."""
    bags, labels, rows, numbers, positions = zip(*items, strict=True)
    longest = max(len(b) for b in bags)
    padded = bags[0].new_zeros((len(bags), longest, *bags[0].shape[1:]))
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    kept = torch.full((len(bags), longest), -1, dtype=torch.int64)
    for j, (bag, where) in enumerate(zip(bags, positions, strict=True)):
        padded[j, : len(bag)] = bag
        mask[j, : len(bag)] = True
        kept[j, : len(bag)] = where
    return (padded, mask, torch.stack(labels), torch.as_tensor(rows, dtype=torch.int64),
            torch.as_tensor(numbers, dtype=torch.int64), kept)
