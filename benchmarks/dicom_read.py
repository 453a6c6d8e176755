"""DICOM series -> HU volume: this project's reader against SimpleITK's ImageSeriesReader, in the same run.

    python benchmarks/dicom_read.py [--slices 300] [--size 512] [--repeats 3] [--json PATH]

A synthetic chest CT is written as one uncompressed file per slice (explicit VR little endian, shuffled random
file names, as a PACS export); both readers then read the folder from the page cache. SimpleITK's time includes
`GetGDCMSeriesFileNames` (its sorting pass) and the copy to NumPy; ours is `read_volume` (HU float32, canonical
orientation, checks) and `read_raw_volume` (stored values, what `prepare` uses). Median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import machine, print_table
from dicom_series import write_series

from ctplatform.data import read_raw_volume, read_volume
from ctplatform.data.synthetic.anatomy import synthesize_scan
from ctplatform.labels import NUM_CLASSES


def simpleitk_read(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the table and the machine to this JSON file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    try:
        block, _ = synthesize_scan(0, 1, 0, (args.size, args.size, 30), [1] * NUM_CLASSES)
        block = np.round(block.transpose(2, 0, 1))
        hu = np.concatenate([block] * (args.slices // 30 + 1))[: args.slices]  # anatomy repeated along z
        start = time.perf_counter()
        write_series(work / "series", hu, spacing=(1.0, 0.7, 0.7))
        print(f"wrote {args.slices} slices of {args.size}x{args.size} in {time.perf_counter() - start:.1f} s")
        folder = work / "series"
        simpleitk_read(folder)  # warm the page cache for both readers
        baseline, reference = timed(lambda: simpleitk_read(folder), args.repeats)
        ours, volume = timed(lambda: read_volume(folder), args.repeats)
        raw, _ = timed(lambda: read_raw_volume(folder), args.repeats)
        assert np.array_equal(volume.hu, np.clip(reference[:, ::-1, ::-1], -1024, 3071).astype(np.float32))
        rows = [
            {"reader": "SimpleITK ImageSeriesReader (baseline)", "seconds": baseline,
             "slices/s": args.slices / baseline, "ratio": 1.0},
            {"reader": "ctplatform read_volume (HU float32)", "seconds": ours, "slices/s": args.slices / ours,
             "ratio": baseline / ours},
            {"reader": "ctplatform read_raw_volume (stored int16)", "seconds": raw, "slices/s": args.slices / raw,
             "ratio": baseline / raw},
        ]
        print_table(f"DICOM series read, {args.slices} x {args.size}x{args.size} (ratio > 1: faster than SimpleITK)",
                    rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
