"""Slice cache -> training batches: slices/s against a bare memcpy of the same bytes, in the same run.

    python benchmarks/loader.py [--volumes 24] [--image-size 224] [--out DIR]

"training-ready" = batches of int16 HU slices from the DataLoader, then HU windowing to float (B, 3, S, S) on the
CPU (on a GPU machine that step runs on the GPU, in `on_after_batch_transfer`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, save

from ctplatform.data.datasets import SliceDataset, load_cache_index
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.synthetic import generate_dataset
from ctplatform.model.windows import hu_to_input


def measure(loader: DataLoader, window: bool, min_seconds: float = 3.0) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for hu, _labels, _volume, _item in loader:
            if window:
                hu_to_input(hu, "three")
            count += hu.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to try")
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        generate_dataset(work / "data", num_volumes=args.volumes, size=(128, 128, 64), seed=0)
        run_prepare(work / "data", work / "cache", PreprocessSettings(image_size=args.image_size, num_slices=32),
                    executor="local", progress=False)
        index = load_cache_index(work / "cache")
        dataset = SliceDataset(index, "train")
        arrays = [np.load(index.root / f, mmap_mode="r") for f in index.files]
        start, copied = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            for array in arrays:
                copied += np.array(array).shape[0]
        floor = copied / (time.perf_counter() - start)
        rows = [{"path": "bare memcpy of cached volumes", "workers": 0, "slices/s": floor, "ratio": 1.0}]
        for workers in (int(w) for w in args.workers.split(",")):
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                persistent_workers=workers > 0)
            for window in (False, True):
                rate = measure(loader, window)
                rows.append({"path": "DataLoader" + (" + HU windowing (CPU)" if window else ""),
                             "workers": workers, "slices/s": rate, "ratio": rate / floor})
        print_table(f"loader: {len(dataset)} cached {args.image_size}² slices, batch {args.batch_size}, shuffled",
                    rows)
        save(args.json, "loader", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
