"""Synthetic data generation: volumes/s with one process against several (`generate_dataset(workers=N)`).

    python benchmarks/synthetic.py [--volumes 240] [--size 64x64x48] [--workers N] [--out DIR]

Both runs write the same bytes (tests/test_synthetic.py checks that); the ratio is the parallel speed-up, which is
what lets a short GPU session generate thousands of volumes for mil_vs_slice.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, save

from ctplatform.data.synthetic import generate_dataset, parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=240)
    parser.add_argument("--size", default="64x64x48")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_synthetic_"))
    try:
        rows = []
        for workers in dict.fromkeys((1, args.workers)):
            start = time.perf_counter()
            generate_dataset(work / f"w{workers}", num_volumes=args.volumes, size=parse_size(args.size), seed=0,
                             workers=workers)
            rate = args.volumes / (time.perf_counter() - start)
            rows.append({"workers": workers, "volumes/s": rate, "ratio": rate / rows[0]["volumes/s"] if rows else 1.0})
        print_table(f"synthetic data: {args.volumes} volumes of {args.size}", rows)
        save(args.json, "synthetic", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
