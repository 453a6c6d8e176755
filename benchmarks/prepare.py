"""prepare's throughput against the floor: bare gzip decompression of the same files, in the same run.

    python benchmarks/prepare.py --volumes 384 --distinct 24 --size 256x256x128 --repeat 3 [--json DIR]

Rows: bare `gzip.decompress` (zlib) of every file (one core), bare `isal.igzip.decompress` (ISA-L), each in a
fresh Python process, the same ISA-L call in a process whose allocator keeps freed buffers for the next file
(`ctplatform.heap.reuse_large_buffers`, as prepare's processes do: a stricter floor), `prepare --no-ray`
(in-process, one core), `prepare` on a fresh local Ray with each of `--workers`, and with `--nodes N` on a fresh
cluster of N raylets of one CPU each on this machine. "vs ISA-L floor" = volumes/s per core (vol/s divided by the
workers or raylets) over the bare single-core ISA-L volumes/s of the same files measured in the same repeat; each
row shows the median of `--repeat` runs, and the per-repeat ratios. "CPU ms/vol" counts the CPU seconds of every
process and thread the row uses (the driver, and for Ray its daemons and workers; `CpuMeter`) per volume, and "vs
ISA-L floor per CPU-second" is the floor's CPU per volume (single-threaded, so its wall time) over it: the share of
the CPU spent that a bare inflate would need, whatever the cores did meanwhile.

What the Ray rows include: every run starts a fresh local Ray; its `ray.init` is excluded from "vol/s" (shown as
"end-to-end vol/s", which adds Ray's start and stop, the listing and the index), but the Ray workers' own cold
start (process start, importing torch and the readers) and every task's cost are inside. A fair figure needs a
job long enough to amortise that start, as a real one is (CT-RATE: 50,188 volumes): `--volumes` sets the job's
size; drawing synthetic scans is slow (~4 s per 256x256x128 scan per core), so `--distinct` scans are drawn and
the data set is filled up to `--volumes` with hard links to them under new patient names. Every file is read once
before timing, so every row decodes from the page cache. `--data DIR` keeps the drawn data set there for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
import psutil
from _common import print_table, save

from ctplatform.data import prepare_ray
from ctplatform.data.prepare import run_prepare
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.synthetic import generate_dataset, parse_size

NAME = re.compile(r"^(train|valid)_(\d+)_")


def fill_up(root: Path, total: int) -> None:
    """Grow the data set under `root` to `total` volumes: hard links to its scans under new patient numbers, with
    their label and metadata rows copied."""
    files = sorted(root.rglob("*.nii.gz"))
    if len(files) >= total:
        return
    top = {split: max(int(NAME.match(f.name)[2]) for f in files if f.name.startswith(split)) for split in
           ("train", "valid")}

    def renamed(text: str, copy: int) -> str:  # train_7_a_1 -> train_{7 + copy * top}_a_1 (in any path part)
        return NAME.sub(lambda m: f"{m[1]}_{int(m[2]) + copy * top[m[1]]}_", text)

    made: dict[str, str] = {}
    copy = 1
    while len(files) + len(made) < total:
        for f in files[: total - len(files) - len(made)]:
            parts = f.relative_to(root).parts
            target = root.joinpath(*(renamed(part, copy) for part in parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
            made[target.name] = f.name
        copy += 1
    for csv in [*root.glob("multi_abnormality_labels/*.csv"), *root.glob("metadata/*.csv")]:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        rows = frame.set_index("VolumeName")
        extra = [rows.loc[source].rename(name) for name, source in made.items() if source in rows.index]
        if extra:
            grown = pd.concat([rows, pd.DataFrame(extra)]).rename_axis("VolumeName").reset_index()
            temporary = csv.with_suffix(".tmp")  # a new file, not written through: `csv` may be a hard link too
            grown.to_csv(temporary, index=False)
            os.replace(temporary, csv)


class CpuMeter:
    """CPU seconds (user + system, every thread) of this process and every process it starts while measured (a
    local Ray's GCS, raylet, dashboard and workers), by kind, sampled every 0.2 s: a process that ends between two
    samples loses at most its last 0.2 s. Wall-clock rates use more than the cores a row names (the in-process
    path's writer thread and torch's threads run on the other core); CPU seconds count all of it."""

    def __init__(self):
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.me = psutil.Process()
        self.start_cpu = self._cpu(self.me)

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    @staticmethod
    def _kind(process: psutil.Process) -> str:
        command = " ".join(process.cmdline())
        if "default_worker.py" in command or command.startswith("ray::"):
            return "Ray workers"
        return "Ray daemons (GCS, raylet, dashboard, monitors)"

    def _sample(self) -> None:
        for process in self.me.children(recursive=True):
            try:
                kind = self.last[process.pid][0] if process.pid in self.last else self._kind(process)
                self.last[process.pid] = (kind, self._cpu(process))
            except psutil.Error:
                pass  # ended since it was listed

    def __enter__(self) -> CpuMeter:
        self._sample()  # processes already running (a cluster's daemons): only their CPU from now on counts
        self.base = {pid: seconds for pid, (_kind, seconds) in self.last.items()}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self._sample()

    def __exit__(self, *exc_info) -> None:
        self._sample()
        self.stop.set()
        self.thread.join()
        self.by_kind = {"driver": self._cpu(self.me) - self.start_cpu}
        for pid, (kind, seconds) in self.last.items():
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + seconds - self.base.get(pid, 0.0)

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())


FLOOR_SCRIPT = """
import gzip, json, sys, time
from pathlib import Path
from isal import igzip
from ctplatform.heap import reuse_large_buffers

files, reuse = [Path(f) for f in json.loads(sys.stdin.read())], sys.argv[1] == "reuse"
if reuse:
    reuse_large_buffers()
rates = {}
for label, decompress in [("ISA-L", igzip.decompress)] + ([] if reuse else [("zlib", gzip.decompress)]):
    start = time.perf_counter()
    for f in files:
        decompress(f.read_bytes())
    rates[label] = len(files) / (time.perf_counter() - start)
print(json.dumps(rates))
"""


@contextmanager
def raylets(nodes: int) -> Iterator[str | None]:
    """The address of a fresh Ray cluster of `nodes` raylets (1 CPU each) on this machine; None for no nodes."""
    if not nodes:
        yield None
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def floor_rates(files: list[Path]) -> dict[str, float]:
    """Volumes/s of the bare inflates, each in a fresh Python process: the floor is the bare call as a user's
    process makes it (the in-process prepare row changes its own process's allocator; `ctplatform.heap`). Also
    ISA-L with that allocator setting ("ISA-L, buffers reused"), the stricter floor."""
    rates = {}
    for mode in ("default", "reuse"):
        run = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, mode], input=json.dumps([str(f) for f in files]),
                             capture_output=True, text=True, check=True)
        found = json.loads(run.stdout)
        rates.update(found if mode == "default" else {"ISA-L, buffers reused": found["ISA-L"]})
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=384, help="volumes in the job (default 384)")
    parser.add_argument("--distinct", type=int, default=24, help="distinct synthetic scans drawn (default 24)")
    parser.add_argument("--size", default="256x256x128")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated (default 1,2)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="also run prepare on a Ray cluster of this many raylets of 1 CPU each on this machine "
                             "(ray.cluster_utils; started before the row's timing, as ray.init is)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every row; the table shows the median")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="volumes per Ray task at most (default: prepare_ray.MAX_BATCH; 1 = a task per volume)")
    parser.add_argument("--data", default=None, help="folder to draw the data set in, or reuse it from")
    parser.add_argument("--json", "--out", dest="json", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    if args.distinct < 3 or args.volumes < args.distinct or args.repeat < 1:
        parser.error("need --distinct >= 3, --volumes >= --distinct and --repeat >= 1")
    ray_workers = [int(w) for w in args.workers.split(",") if w]
    if args.max_batch is not None:
        if args.max_batch < 1:
            parser.error("--max-batch must be >= 1")
        prepare_ray.MAX_BATCH = args.max_batch  # read by prepare_ray.batch_size at each run
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    data = Path(args.data) if args.data else work / "data"
    try:
        stamp = data / f"drawn-{args.distinct}-{args.size}"
        if not stamp.is_file():
            generate_dataset(data, num_volumes=args.distinct, size=parse_size(args.size), seed=0,
                             workers=os.cpu_count() or 1)
            stamp.write_text("")
        fill_up(data / "dataset", args.volumes)
        files = sorted((data / "dataset").rglob("*.nii.gz"))
        if len(files) != args.volumes:
            parser.error(f"{data} holds {len(files)} volumes, not --volumes {args.volumes}: use another --data")
        compressed_mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:  # warm the page cache so every row reads from memory
            f.read_bytes()
        settings = PreprocessSettings(image_size=args.image_size, num_slices=32)
        runs: dict[tuple[str, int], list[dict]] = {}
        for repeat in range(args.repeat):
            floors = floor_rates(files)
            for name, label in (("bare gzip.decompress (zlib)", "zlib"), ("bare igzip.decompress (ISA-L)", "ISA-L"),
                                ("bare igzip.decompress (ISA-L), buffers reused", "ISA-L, buffers reused")):
                runs.setdefault((name, 1), []).append({"vol/s": floors[label], "floor": floors["ISA-L"],
                                                       "stricter floor": floors["ISA-L, buffers reused"]})
            rows_to_run = [("local", 1)] + [("ray", w) for w in ray_workers] + ([("cluster", args.nodes)]
                                                                                 if args.nodes else [])
            for executor, workers in rows_to_run:
                out = work / "cache"
                with raylets(args.nodes if executor == "cluster" else 0) as address:
                    start = time.perf_counter()
                    with CpuMeter() as cpu:
                        summary = run_prepare(data, out, settings, executor="local" if executor == "local" else "ray",
                                              workers=None if address else workers, address=address,
                                              progress=False)
                    wall = time.perf_counter() - start
                shutil.rmtree(out)
                if summary["cached"] != args.volumes:
                    raise RuntimeError(f"prepare cached {summary['cached']} of {args.volumes} volumes: {summary}")
                name = {"local": "prepare (in-process)", "ray": "prepare (Ray tasks)",
                        "cluster": "prepare (Ray tasks, one raylet per CPU)"}[executor]
                runs.setdefault((name, workers), []).append(
                    {"vol/s": summary["volumes_per_second"], "end-to-end vol/s": args.volumes / wall,
                     "floor": floors["ISA-L"], "stricter floor": floors["ISA-L, buffers reused"],
                     "CPU ms/vol": 1000 * cpu.total / args.volumes,
                     "CPU by kind": cpu.by_kind})
            print(f"repeat {repeat + 1}/{args.repeat} done", flush=True)
        rows = []
        for (name, workers), results in runs.items():
            ratios = [r["vol/s"] / workers / r["floor"] for r in results]
            row = {"path": name, "workers": workers, "vol/s": statistics.median(r["vol/s"] for r in results)}
            if "end-to-end vol/s" in results[0]:
                row["end-to-end vol/s"] = statistics.median(r["end-to-end vol/s"] for r in results)
            row["MB/s (compressed)"] = row["vol/s"] * compressed_mb / len(files)
            row["vs ISA-L floor per core (median)"] = statistics.median(ratios)
            row["per repeat"] = " ".join(f"{r:.2f}" for r in ratios)
            row["vs ISA-L floor with buffers reused, per core"] = statistics.median(
                r["vol/s"] / workers / r["stricter floor"] for r in results)
            if "CPU ms/vol" in results[0]:  # the floor's CPU per volume (one core, so its wall time) over the row's
                row["CPU ms/vol"] = statistics.median(r["CPU ms/vol"] for r in results)
                row["vs ISA-L floor per CPU-second"] = statistics.median(1000 / r["floor"] / r["CPU ms/vol"]
                                                                         for r in results)
                kinds = {k for r in results for k in r["CPU by kind"]}
                row["CPU s by process"] = ", ".join(
                    f"{k} {statistics.median(r['CPU by kind'].get(k, 0.0) for r in results):.1f}"
                    for k in sorted(kinds))
            rows.append(row)
        print_table(f"prepare: {len(files)} volumes ({args.distinct} distinct) of {args.size}, {compressed_mb:.0f} MB "
                    f"gzipped, to {args.image_size}² x 32 slices; Ray tasks of up to {prepare_ray.MAX_BATCH} "
                    f"volumes; median of {args.repeat}; load average {os.getloadavg()[0]:.2f}", rows)
        save(args.json, "prepare", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
