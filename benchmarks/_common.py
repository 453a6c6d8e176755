"""Shared helpers for the benchmark scripts: machine description, table printing, test data and an S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\nmachine: {machine()}")
    if not rows:
        return
    columns = list(dict.fromkeys(column for row in rows for column in row))  # rows may add columns
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def save(path: str | None, name: str, rows: list[dict]) -> None:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        text = json.dumps({"machine": machine(), "rows": rows}, indent=2, default=_plain)
        (Path(path) / f"{name}.json").write_text(text)


def random_cache(root: Path, train_volumes: int, valid_volumes: int, slices: int, size: int, seed: int = 0) -> Path:
    """A slice cache of random int16 HU volumes (throughput only: no anatomy), built in seconds."""
    import numpy as np

    from ctplatform.atomic import write_atomic, write_json_atomic
    from ctplatform.data.prepare import CACHE_FORMAT, records_to_index
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.labels import NUM_CLASSES

    rng = np.random.default_rng(seed)
    records = []
    for split, count in (("train", train_volumes), ("valid", valid_volumes)):
        for i in range(count):
            stem = f"{split}_{i + 1}_a_1"
            volume = rng.integers(-1024, 1500, size=(slices, size, size), dtype=np.int16)
            relative = f"volumes/{split}/{stem}.npy"
            write_atomic(root / relative, lambda handle, v=volume: np.save(handle, v))
            records.append({"VolumeName": f"{stem}.nii.gz", "stem": stem, "patient": f"{split}_{i + 1}",
                            "split": split, "file": relative, "num_slices": slices,
                            "slice_positions": list(range(slices)), "source_slices": slices,
                            "spacing": [1.0, 1.0, 1.0], "hu_source": "header", "notes": "",
                            "labels": rng.integers(0, 2, NUM_CLASSES).tolist()})
    index = records_to_index(records)
    write_atomic(root / "index.parquet", lambda handle: index.to_parquet(handle, index=False))
    settings = PreprocessSettings(image_size=size, num_slices=slices)
    write_json_atomic(root / "cache.json", {"format": CACHE_FORMAT, "preprocess": settings.to_dict()})
    return root


def _plain(value):
    """numpy scalars (a row's int64 counts, float32 figures) as the Python numbers json writes."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """moto in server mode on 127.0.0.1 (the S3-protocol server of the tests), in its own process, for as long as the
    block runs; yields the AWS_* environment that reaches it (any key is accepted)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        process.terminate()
        process.wait(timeout=10)
