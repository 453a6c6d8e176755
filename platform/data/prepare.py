"""`ctplatform prepare`: CT-RATE volumes -> a resumable, memory-mappable slice cache.

Cache layout (under `--out`, what training calls `--slice-dir`):

    cache.json                    preprocessing settings (a rerun with other settings is refused)
    volumes/{split}/{stem}.npy    int16 HU, (K, S, S) C-contiguous: one volume's slices in one file
    records/{stem}.json           per-volume record, written after its .npy: "this volume is done"
    failed/{stem}.json            per-volume failure (retried on the next run)
    index.parquet                 one row per volume: name, patient, split, file, slice positions, labels, notes
    failures.csv                  every bad volume and why
    slices/{split}/*.npy, splits/{split}_slices.csv   the legacy layout (with --legacy-layout)

Why int16 HU in one .npy per volume: CT values are integers in [-1024, 3071], so int16 is exact and half of
float32; windowing is a cheap elementwise op done on the GPU, so one cache serves every window; `.npy` can be
memory-mapped (`np.load(mmap_mode="r")`) and slice k of a volume is one contiguous S*S*2-byte block, so a loader
reads a single slice, or a window of neighbouring slices, without touching the rest. One file per volume makes
each volume's write atomic and the job resumable volume by volume.

Resumability: each volume's .npy and record are written whole (a temp file renamed on disk; a single object in an
object store, which appears only once its upload completes), record last; the index and failures file are
rebuilt from the records at the end, sorted by name, so a run killed at any point and rerun gives a cache
identical to an uninterrupted one. A volume file without its record (a run killed between the two, or a partial
file left by a store that shows uploads in progress) is not in the index and is written again by the rerun.

The per-volume work (decode, preprocess, write) is `prepare_worker`'s, so a Ray worker imports neither pandas nor
this module; `prepare_volume` and `VolumeTask` stay importable from here.

`--data-dir` and `--out` may be object-store URIs (`ctplatform.storage`): volumes are then copied to the node
that decodes them (`ctplatform.data.remote_input`) and the cache's files are written to the store by the task
that made them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ctplatform import storage
from ctplatform.atomic import write_atomic, write_bytes_atomic
from ctplatform.data.errors import DataFormatError
from ctplatform.data.labels_csv import read_labels_csv
from ctplatform.data.metadata import VolumeMetadata, read_metadata_csv
from ctplatform.data.paths import VolumeFinder, dataset_root, find_label_files, find_metadata_files, parse_volume_name
from ctplatform.data.prepare_worker import VolumeTask, json_bytes, prepare_volume, prepare_volumes  # noqa: F401 re-export
from ctplatform.data.preprocess import PreprocessSettings, torch_threads
from ctplatform.data.remote_input import mirror_listing, rename_error, to_uri
from ctplatform.data.splits import patient_of, patient_split
from ctplatform.labels import CLASS_NAMES, volume_stem

CACHE_FORMAT = 1


def discover_tasks(data_dir: str | Path) -> list[VolumeTask]:
    """Every labelled volume under `data_dir` (a folder or a URI) with its split, patient, file and metadata,
    sorted by name."""
    if not storage.is_uri(str(data_dir)):
        return _discover_local(data_dir)
    uri = str(data_dir)
    with tempfile.TemporaryDirectory(prefix="ctplatform-listing-") as temp:
        root = Path(temp)
        if not mirror_listing(uri, root):
            raise DataFormatError(uri, "no files here (empty or missing prefix)")
        try:
            tasks = _discover_local(root)
        except DataFormatError as exc:
            raise rename_error(exc, root, uri) from None
        return [dataclasses.replace(t, path=to_uri(t.path, root, uri) if t.path is not None else None)
                for t in tasks]


def _discover_local(data_dir: str | Path) -> list[VolumeTask]:
    files = find_label_files(data_dir)
    if not files:
        raise DataFormatError(
            data_dir,
            "no label CSV found: expected multi_abnormality_labels/{train,valid}_predicted_labels.csv "
            "or multi_abnormality_labels.csv",
        )
    metadata: dict[str, VolumeMetadata] = {}
    for path in find_metadata_files(data_dir):
        metadata.update(read_metadata_csv(path))
    splits: dict[str, str] = {}
    frames = []
    for split, path in files.items():
        frame = read_labels_csv(path)
        frames.append(frame)
        if split != "all":
            splits.update(dict.fromkeys(frame.index, split))
    labels = pd.concat(frames)
    duplicated = labels.index[labels.index.duplicated()]
    if len(duplicated):
        raise DataFormatError(data_dir, f"volume {duplicated[0]!r} appears in more than one label file")
    unassigned = [n for n in labels.index if n not in splits]
    by_name = {n: parse_volume_name(n) for n in unassigned}
    if any(ident is None for ident in by_name.values()):
        splits.update(patient_split(unassigned))  # not CT-RATE names: split by patient ourselves
    else:
        splits.update({n: ident.split for n, ident in by_name.items()})  # type: ignore[union-attr]
    finder = VolumeFinder(dataset_root(data_dir))
    tasks = []
    for name in sorted(labels.index):
        path = finder.find(name)
        tasks.append(
            VolumeTask(
                volume_name=name,
                split=splits[name],
                patient=patient_of(name),
                path=str(path) if path is not None else None,
                labels=tuple(int(v) for v in labels.loc[name].to_numpy()),
                metadata=metadata.get(volume_stem(name)),
            )
        )
    return tasks


def _write_json(location: str, value) -> None:
    storage.write_bytes(location, json_bytes(value))


def open_cache(out_dir: str | Path, settings: PreprocessSettings) -> str:
    """Create the cache folder, or check that an existing one was made with the same settings; returns the cache's
    location (an absolute folder or the URI)."""
    out = str(out_dir) if storage.is_uri(str(out_dir)) else str(Path(out_dir).resolve())
    manifest = storage.join(out, "cache.json")
    wanted = {"format": CACHE_FORMAT, "preprocess": settings.to_dict()}
    if storage.is_file(manifest):
        found = json.loads(storage.read_text(manifest))
        if found != wanted:
            raise DataFormatError(
                manifest, f"cache was prepared with other settings ({found['preprocess']}); use another --out"
            )
    else:
        _write_json(manifest, wanted)
    return out


def _stems(folder: str) -> set[str]:
    """The stems of the `.json` files in a cache subfolder (one listing, also for an object store)."""
    return {name[: -len(".json")] for name in storage.list_files(folder) if name.endswith(".json") and "/" not in name}


def pending_tasks(tasks: Iterable[VolumeTask], out_dir: str | Path) -> list[VolumeTask]:
    """Tasks whose record is missing: finished volumes are skipped on a rerun; failed ones are retried."""
    done = _stems(storage.join(str(out_dir), "records"))
    return [t for t in tasks if t.stem not in done]


def _read_json_files(folder: str, stems: list[str]) -> list[dict]:
    if not stems:
        return []
    fs, root = storage.filesystem(folder)
    paths = [f"{root.rstrip('/')}/{stem}.json" for stem in stems]
    contents = fs.cat(paths)  # concurrent requests on an object store
    return [json.loads(contents[p]) for p in paths]


def finalize_cache(out_dir: str | Path, tasks: list[VolumeTask], legacy_layout: bool = False) -> pd.DataFrame:
    """Rebuild index.parquet and failures.csv from the per-volume records (sorted, so deterministic)."""
    out = str(out_dir)
    records, failed = _stems(storage.join(out, "records")), _stems(storage.join(out, "failed"))
    rows = _read_json_files(storage.join(out, "records"), [t.stem for t in tasks if t.stem in records])
    failures = _read_json_files(storage.join(out, "failed"),
                                [t.stem for t in tasks if t.stem not in records and t.stem in failed])
    index = records_to_index(rows)
    parquet = io.BytesIO()
    index.to_parquet(parquet, index=False)
    storage.write_bytes(storage.join(out, "index.parquet"), parquet.getvalue())
    failures_frame = pd.DataFrame(failures, columns=["VolumeName", "path", "reason"])
    storage.write_bytes(storage.join(out, "failures.csv"), failures_frame.to_csv(index=False).encode())
    if legacy_layout:
        write_legacy_layout(Path(out), index)
    return index


def records_to_index(rows: list[dict]) -> pd.DataFrame:
    columns = ["VolumeName", "stem", "patient", "split", "file", "num_slices", "slice_positions",
               "source_slices", "hu_source", "notes"]
    frame = pd.DataFrame([{c: r[c] for c in columns} for r in rows], columns=columns)
    spacing = np.array([r["spacing"] for r in rows], dtype=np.float64).reshape(-1, 3)
    frame["spacing_z"], frame["spacing_y"], frame["spacing_x"] = spacing[:, 0], spacing[:, 1], spacing[:, 2]
    labels = np.array([r["labels"] for r in rows], dtype=np.int8).reshape(-1, len(CLASS_NAMES))
    for j, name in enumerate(CLASS_NAMES):
        frame[name] = labels[:, j]
    return frame.sort_values("VolumeName", kind="stable").reset_index(drop=True)


def write_legacy_layout(out: Path, index: pd.DataFrame) -> None:
    """The legacy layout: one 2-D int16 HU .npy per slice and a CSV of slices per split."""
    for split, group in index.groupby("split", sort=True):
        rows = []
        for row in group.to_dict("records"):  # records, not itertuples: class names contain spaces
            slices = np.load(out / row["file"], mmap_mode="r")
            for k, position in enumerate(row["slice_positions"]):
                name = f"{row['stem']}_slice{int(position):04d}.npy"
                target = out / "slices" / split / name
                if not target.is_file():
                    write_atomic(target, lambda handle, s=slices[k]: np.save(handle, np.asarray(s), allow_pickle=False))
                rows.append({"slice_path": f"slices/{split}/{name}", "VolumeName": row["VolumeName"],
                             "slice_index": int(position), **{c: int(row[c]) for c in CLASS_NAMES}})
        frame = pd.DataFrame(rows)
        write_bytes_atomic(out / "splits" / f"{split}_slices.csv", frame.to_csv(index=False).encode())


def run_prepare(
    data_dir: str | Path,
    out_dir: str | Path,
    settings: PreprocessSettings,
    *,
    executor: str = "ray",
    address: str | None = None,
    workers: int | None = None,
    keep_non_chest: bool = False,
    legacy_layout: bool = False,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Prepare every labelled volume; returns a summary. `executor` is "ray" (default) or "local" (in-process)."""
    if legacy_layout and storage.is_uri(str(out_dir)):
        raise ValueError(f"--legacy-layout writes one file per slice: give a local --out, not {out_dir}")
    tasks = discover_tasks(data_dir)
    out = open_cache(out_dir, settings)
    todo = pending_tasks(tasks, out)
    started = time.perf_counter()
    if executor == "ray":
        from ctplatform.data.prepare_ray import prepare_with_ray  # Ray stays in its adapter module

        elapsed = prepare_with_ray(todo, out, settings, keep_non_chest, address=address, workers=workers,
                                   progress=progress, on_result=on_result)
    elif executor == "local":
        from tqdm import tqdm

        with tqdm(total=len(todo), unit="vol", disable=not progress, desc="prepare") as bar, torch_threads(1):
            for result in prepare_volumes(todo, out, settings, keep_non_chest):
                bar.update(1)
                if on_result is not None:
                    on_result(result)
        elapsed = time.perf_counter() - started
    else:
        raise ValueError(f"invalid executor {executor!r}: choose ray or local")
    index = finalize_cache(out, tasks, legacy_layout=legacy_layout)
    failures = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, "failures.csv"))))
    return {
        "volumes": len(tasks),
        "prepared_now": len(todo),
        "cached": len(index),
        "failed": len(failures),
        "seconds": round(elapsed, 2),  # processing only (a Ray cluster's start-up is not counted)
        "volumes_per_second": round(len(todo) / elapsed, 2) if elapsed > 0 and todo else None,
        "index": storage.join(out, "index.parquet"),
        "failures": storage.join(out, "failures.csv"),
    }
