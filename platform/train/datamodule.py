"""LightningDataModules over the slice cache: int16 HU in, windowing and augmentation on the device.

:class:`CTDataModule` serves slices (the slice head); :class:`VolumeBagDataModule` serves volumes as padded bags of
K slices with a mask (the attention-MIL head), or bags of cached slice features with a frozen encoder.
:func:`build_datamodule` picks the one a configuration needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ctplatform.config import TrainConfig
from ctplatform.data.datasets import (
    CacheIndex,
    FeatureBagDataset,
    SliceBagDataset,
    SliceDataset,
    collate_bags,
    load_cache_index,
)
from ctplatform.train.lightning_import import pl


class CTDataModule(pl.LightningDataModule):
    collate_fn: Callable | None = None  # DataLoader's default: stack slices
    prefetch_factor = 4

    def __init__(self, slice_dir: str, batch_size: int = 32, num_workers: int = 2, seed: int = 0,
                 local_cache_gb: float = 50.0):
        super().__init__()
        self.slice_dir = slice_dir
        self.local_cache_gb = local_cache_gb
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.index: CacheIndex | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.index is None:
            self.index = load_cache_index(self.slice_dir, self.local_cache_gb)
            self.train_set = SliceDataset(self.index, "train")
            self.val_set = SliceDataset(self.index, "valid")

    def train_labels(self) -> np.ndarray:
        """Volume labels of the training split (for BCE class weights)."""
        self.setup()
        return self.index.labels()[self.index.split_volumes("train")]

    def loader_batch_size(self) -> int:
        return self.batch_size

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        workers, size = self.num_workers, self.loader_batch_size()
        return DataLoader(
            dataset,
            batch_size=size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > size,  # no tiny last batch for BatchNorm in training
            num_workers=workers,
            collate_fn=self.collate_fn,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class VolumeBagDataModule(CTDataModule):
    """Volumes as bags of slices for the attention-MIL head.

    A batch is ``collate_bags``' tuple: padded int16 HU ``(B, K, S, S)``, mask ``(B, K)``, labels, volume rows,
    items and slice positions. ``batch_size`` counts slices, as for the slice head: a batch holds
    ``max(1, batch_size // K)`` volumes, K being the largest training bag (``slices_per_volume`` or the cache's
    slice count), so one step runs about as many slices through the encoder as a slice-head step.
    """

    collate_fn = staticmethod(collate_bags)
    prefetch_factor = 2

    def __init__(self, slice_dir: str, batch_size: int = 32, num_workers: int = 2, seed: int = 0,
                 slices_per_volume: int | None = None, local_cache_gb: float = 50.0):
        super().__init__(slice_dir, batch_size, num_workers, seed, local_cache_gb)
        self.slices_per_volume = slices_per_volume
        self.volumes_per_batch = 1

    def setup(self, stage: str | None = None) -> None:
        if self.index is None:
            self.index = load_cache_index(self.slice_dir, self.local_cache_gb)
            self.train_set = SliceBagDataset(self.index, "train", self.slices_per_volume, random_subsample=True)
            self.val_set = SliceBagDataset(self.index, "valid")
            self.volumes_per_batch = max(1, self.batch_size // self.train_set.max_slices())

    def use_features(self, extract: Callable[[torch.Tensor], torch.Tensor], key: str,
                     feature_dir: str | None = None, batch_size: int = 64) -> None:
        """Serve bags of frozen-encoder features instead of HU slices (all cached slices of each volume)."""
        from ctplatform.train.slice_features import cached_slice_features

        self.setup()
        features = cached_slice_features(extract, key, self.index, feature_dir, batch_size)
        labels = self.index.labels()
        for name, split in (("train_set", "train"), ("val_set", "valid")):
            rows = self.index.split_volumes(split)
            setattr(self, name, FeatureBagDataset([features[r] for r in rows], rows, labels))

    def loader_batch_size(self) -> int:
        return self.volumes_per_batch


def build_datamodule(cfg: TrainConfig) -> CTDataModule:
    """The data module for a configuration: slices for the slice head, bags of slices for attention-MIL."""
    if cfg.head == "attention-mil":
        return VolumeBagDataModule(cfg.slice_dir, cfg.batch_size, cfg.num_workers, seed=cfg.seed,
                                   slices_per_volume=cfg.mil_slices, local_cache_gb=cfg.local_cache_gb)
    return CTDataModule(cfg.slice_dir, cfg.batch_size, cfg.num_workers, seed=cfg.seed,
                        local_cache_gb=cfg.local_cache_gb)
