"""LightningDataModule over the slice cache: int16 HU slices in, windowing and augmentation on the device."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ctplatform.data.datasets import CacheIndex, SliceDataset, load_cache_index
from ctplatform.train.lightning_import import pl


class CTDataModule(pl.LightningDataModule):
    def __init__(self, slice_dir: str, batch_size: int = 32, num_workers: int = 2, seed: int = 0):
        super().__init__()
        self.slice_dir = slice_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.index: CacheIndex | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.index is None:
            self.index = load_cache_index(self.slice_dir)
            self.train_set = SliceDataset(self.index, "train")
            self.val_set = SliceDataset(self.index, "valid")

    def train_labels(self) -> np.ndarray:
        """Volume labels of the training split (for BCE class weights)."""
        self.setup()
        return self.index.labels()[self.index.split_volumes("train")]

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,  # no tiny last batch for BatchNorm in training
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
