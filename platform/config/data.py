"""Where the data is and how it is loaded for training."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


@dataclass
class DataConfig:
    """Data: the CT-RATE folder, the prepared slice cache and how batches are loaded"""

    data_dir: str = option("./ct_rate_data", "CT-RATE folder (for prepare)")
    slice_dir: str = option("./ct_rate_2d", "prepared slice cache")
    num_workers: int = option(2, "DataLoader worker processes per training process")
    image_size: int | None = option(None, "train at this slice size (default: the cache's)")
