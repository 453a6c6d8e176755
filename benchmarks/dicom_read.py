"""DICOM series -> HU volume: this project's reader against SimpleITK's ImageSeriesReader, in the same run.

    python benchmarks/dicom_read.py [--slices 300] [--size 512] [--repeats 3] [--json PATH]

A synthetic chest CT is written as one uncompressed file per slice (explicit VR little endian, shuffled random
file names, as a PACS export); both readers then read the folder from the page cache. SimpleITK's time includes
`GetGDCMSeriesFileNames` (its sorting pass) and the copy to NumPy; ours is `read_volume` (HU float32, canonical
orientation, checks) and `read_raw_volume` (stored values, what `prepare` uses), from the folder and from a deflated
.zip of it (inflated in memory). Median of `--repeats` rounds, the readers taking turns in each.
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


def simpleitk_read(folder: Path, pixel_type: int | None = None) -> np.ndarray:
    """SimpleITK's series read: int16 HU by default (ITK applies the rescale in the stored type when it fits), or
    `pixel_type` (sitkFloat32: HU as float32, what `read_volume` returns)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    if pixel_type is not None:
        reader.SetOutputPixelType(pixel_type)
    return sitk.GetArrayFromImage(reader.Execute())


def interleaved(readers: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each reader, the readers taking turns in every round (a busy machine slows all alike)."""
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the table and the machine to this JSON file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    try:
        block, _ = synthesize_scan(0, 1, 0, (args.size, args.size, 30), [1] * NUM_CLASSES)
        block = np.round(block.transpose(2, 0, 1))
        hu = np.concatenate([block] * (args.slices // 30 + 1))[: args.slices]  # anatomy repeated along z
        start = time.perf_counter()
        write_series(work / "series", hu, spacing=(1.0, 0.7, 0.7))
        del block, hu  # 0.6 GB of float64 the timed reads need not share the machine with
        print(f"wrote {args.slices} slices of {args.size}x{args.size} in {time.perf_counter() - start:.1f} s")
        folder = work / "series"
        archive = shutil.make_archive(str(work / "series"), "zip", folder)  # deflated, as users zip a folder
        reference = simpleitk_read(folder)  # also warms the page cache for both readers
        volume = read_volume(folder)
        assert np.array_equal(volume.hu, np.clip(reference[:, ::-1, ::-1], -1024, 3071).astype(np.float32))
        del reference, volume
        median = interleaved({"sitk": lambda: simpleitk_read(folder),
                              "sitk32": lambda: simpleitk_read(folder, sitk.sitkFloat32),
                              "volume": lambda: read_volume(folder),
                              "raw": lambda: read_raw_volume(folder), "zip": lambda: read_raw_volume(archive)},
                             args.repeats)
        baseline, ours, raw, zipped = median["sitk"], median["volume"], median["raw"], median["zip"]
        baseline32 = median["sitk32"]
        rows = [
            {"reader": "SimpleITK ImageSeriesReader (baseline)", "seconds": baseline,
             "slices/s": args.slices / baseline, "ratio": 1.0},
            {"reader": "SimpleITK ImageSeriesReader, float32 output", "seconds": baseline32,
             "slices/s": args.slices / baseline32, "ratio": baseline / baseline32},
            {"reader": "ctplatform read_volume (HU float32)", "seconds": ours, "slices/s": args.slices / ours,
             "ratio": baseline / ours, "ratio to SimpleITK float32": baseline32 / ours},
            {"reader": "ctplatform read_raw_volume (stored int16)", "seconds": raw, "slices/s": args.slices / raw,
             "ratio": baseline / raw},
            {"reader": "ctplatform read_raw_volume, the folder as a deflated .zip", "seconds": zipped,
             "slices/s": args.slices / zipped, "ratio": baseline / zipped},
        ]
        print_table(f"DICOM series read, {args.slices} x {args.size}x{args.size} (ratio > 1: faster than SimpleITK)",
                    rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
