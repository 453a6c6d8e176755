"""Slice cache in object storage -> training items: slices/s per core against the same cache on local disk, in the
same run.

    python benchmarks/object_store_read.py [--volumes 32] [--slices 32] [--image-size 224] [--epochs 3] [--json DIR]

The store is moto in server mode on 127.0.0.1 (the S3-protocol server of the tests), in its own process. Items are
read the way training reads them (`SliceDataset.__getitem__`, a shuffled order, one process = one core):
- local disk: the cache in a local folder (the baseline);
- first epoch: the cache as an `s3://` URI with an empty node-local copy: each volume file is downloaded when its
  first slice is read (`ctplatform.data.local_cache`);
- later epochs: the same URI again, a new dataset (as a new DataLoader worker would open it), the copy now warm.
Figures are per core of the reading process; the server uses the machine's other core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import moto_server, print_table, random_cache, save

from ctplatform import storage
from ctplatform.data.datasets import SliceDataset, load_cache_index


def read_epoch(dataset: SliceDataset, seed: int) -> tuple[float, int]:
    """Seconds to read every item once in a shuffled order, and a checksum (so nothing is optimised away)."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    total = 0
    start = time.perf_counter()
    for i in order:
        image, *_ = dataset[int(i)]
        total += int(image[0, 0])
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="later epochs measured (each a new dataset)")
    parser.add_argument("--json", default=None, help="folder for object_store_read.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="objbench-") as temp:
        local = random_cache(Path(temp, "cache"), args.volumes - args.volumes // 4, args.volumes // 4, args.slices,
                             args.image_size)
        with moto_server() as env:
            os.environ.update(env, CTPLATFORM_CACHE_DIR=str(Path(temp, "node")))
            fs, _ = storage.filesystem("s3://bench")
            fs.mkdir("bench")
            storage.upload(local, "s3://bench/cache")
            rows = []

            def measure(name: str, open_dataset, seed: int) -> float:
                dataset = open_dataset()
                seconds, checksum = read_epoch(dataset, seed)
                rate = len(dataset) / seconds
                rows.append({"read": name, "slices": len(dataset), "seconds": round(seconds, 3),
                             "slices_per_s_per_core": round(rate), "checksum": checksum})
                return rate

            local_rates = [measure("local disk", lambda: SliceDataset(load_cache_index(local), "train"), 0)]
            first = measure("object store, first epoch (cold node-local copy)",
                            lambda: SliceDataset(load_cache_index("s3://bench/cache"), "train"), 0)
            later = []
            for epoch in range(args.epochs):
                local_rates.append(measure("local disk", lambda: SliceDataset(load_cache_index(local), "train"),
                                           epoch + 1))
                later.append(measure("object store, later epoch (warm node-local copy)",
                                     lambda: SliceDataset(load_cache_index("s3://bench/cache"), "train"), epoch + 1))
    baseline = float(np.median(local_rates))
    summary = {"read": "summary", "first_epoch_slices_per_s_per_core": round(first),
               "later_over_local": round(float(np.median(later)) / baseline, 3),
               "first_over_local": round(first / baseline, 3)}
    print_table(f"Slice cache reads, {args.image_size}x{args.image_size} int16 slices, {args.slices} per volume "
                f"(medians over {args.epochs + 1} local and {args.epochs} later epochs)", rows)
    print(f"\nfirst epoch from the object store: {summary['first_epoch_slices_per_s_per_core']:,} slices/s per core "
          f"({summary['first_over_local']}x local disk); later epochs: {summary['later_over_local']}x local disk "
          f"(median local {baseline:,.0f} slices/s)")
    save(args.json, "object_store_read", [*rows, summary])


if __name__ == "__main__":
    main()
