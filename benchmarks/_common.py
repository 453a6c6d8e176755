"""Shared helpers for the benchmark scripts: machine description and table printing."""

from __future__ import annotations

import json
import os
import platform
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
