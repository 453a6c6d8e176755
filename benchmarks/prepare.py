"""prepare's throughput against the floor: bare gzip decompression of the same files, in the same run.

    python benchmarks/prepare.py [--volumes 12] [--size 256x256x160] [--out DIR]

Rows: bare `gzip.decompress` (zlib) of every file (one core), bare `isal.igzip.decompress` (ISA-L, the inflate
prepare uses), `prepare --no-ray` (one core), and `prepare` on a local Ray with 1 and 2 workers. Ratios = volumes/s
per core divided by each bare-decompression volumes/s.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, save
from isal import igzip

from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.synthetic import generate_dataset, parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--size", default="256x256x160")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        generate_dataset(work / "data", num_volumes=args.volumes, size=parse_size(args.size), seed=0)
        files = sorted((work / "data").rglob("*.nii.gz"))
        compressed_mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:  # warm the page cache so every row reads from memory
            f.read_bytes()
        floors = {}
        for label, decompress in (("zlib", gzip.decompress), ("ISA-L", igzip.decompress)):
            start = time.perf_counter()
            for f in files:
                decompress(f.read_bytes())
            floors[label] = len(files) / (time.perf_counter() - start)
        floor, isal_floor = floors["zlib"], floors["ISA-L"]
        rows = [{"path": f"bare {name}", "workers": 1, "vol/s": floors[label],
                 "MB/s (compressed)": floors[label] * compressed_mb / len(files),
                 "ratio per core": floors[label] / floor, "vs ISA-L floor": floors[label] / isal_floor}
                for name, label in (("gzip.decompress (zlib)", "zlib"), ("igzip.decompress (ISA-L)", "ISA-L"))]
        settings = PreprocessSettings(image_size=args.image_size, num_slices=32)
        for executor, workers in (("local", 1), ("ray", 1), ("ray", 2)):
            out = work / f"cache_{executor}_{workers}"
            summary = run_prepare(work / "data", out, settings, executor=executor, workers=workers, progress=False)
            rate = summary["volumes_per_second"]
            rows.append({"path": f"prepare ({'in-process' if executor == 'local' else 'Ray'})", "workers": workers,
                         "vol/s": rate, "MB/s (compressed)": rate * compressed_mb / len(files),
                         "ratio per core": rate / workers / floor, "vs ISA-L floor": rate / workers / isal_floor})
        print_table(f"prepare: {len(files)} volumes of {args.size}, {compressed_mb:.0f} MB gzipped, "
                    f"to {args.image_size}² x 32 slices", rows)
        save(args.out, "prepare", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
