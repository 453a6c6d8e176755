"""Where the data is and how it is loaded for training."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


@dataclass
class DataConfig:
    """Data: the CT-RATE folder, the prepared slice cache and how batches are loaded"""

    data_dir: str = option("./ct_rate_data", "CT-RATE folder (for prepare)", path="uri")
    slice_dir: str = option("./ct_rate_2d", "prepared slice cache (a folder or URI; a URI is read through a node-local "
                                                   "copy, see --local-cache-gb)", path="uri")
    num_workers: int = option(2, "DataLoader worker processes per training process")
    image_size: int | None = option(None, "train at this slice size (default: the cache's)")
    local_cache_gb: float = option(50.0, "a --slice-dir URI: GiB of its files each node keeps on local disk "
                                         "(under $CTPLATFORM_CACHE_DIR, default ~/.cache/ctplatform)")
