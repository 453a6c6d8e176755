"""What `prepare` runs for each volume, on whichever node decodes it: a volume file -> its cache files.

Kept apart from `prepare` (the listing, the index) so a Ray worker imports only what decoding needs: not pandas
(~1 s of each worker's cold start on a busy 2-core machine, paid before its first volume).
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ctplatform import storage
from ctplatform.data import read_raw_volume
from ctplatform.data.errors import DataFormatError, DataNotFoundError, UnusableContentError
from ctplatform.data.hounsfield import NON_CHEST_NOTE
from ctplatform.data.metadata import VolumeMetadata
from ctplatform.data.preprocess import PreprocessSettings, preprocess_raw_volume
from ctplatform.data.remote_input import local_volume
from ctplatform.heap import reuse_large_buffers
from ctplatform.labels import volume_stem


@dataclass(frozen=True)
class VolumeTask:
    volume_name: str  # as in the labels CSV, e.g. "train_1_a_1.nii.gz"
    split: str
    patient: str
    path: str | None  # None: the file was not found
    labels: tuple[int, ...]
    metadata: VolumeMetadata | None

    @property
    def stem(self) -> str:
        return volume_stem(self.volume_name)


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, allow_nan=False) + "\n").encode()


# A volume's writes, in order: (location, bytes) writes the file or object whole; (location, None) removes it.
Writes = list[tuple[str, bytes | None]]


def prepare_volume(task: VolumeTask, out_dir: str, settings: PreprocessSettings, keep_non_chest: bool) -> dict:
    """Prepare one volume; returns its record ("ok") or its failure ("failed"). Never raises for bad input."""
    result, writes = _prepared(task, str(out_dir), settings, keep_non_chest)
    _write(writes)
    return result


def prepare_volumes(tasks: Iterable[VolumeTask], out_dir: str, settings: PreprocessSettings,
                    keep_non_chest: bool) -> Iterator[dict]:
    """`prepare_volume` of each task, in order; each result is yielded once its files are written.

    A volume's files are written (each fsync'd, or uploaded, before it appears; its record last) in one background
    thread while this one decodes the next volume: the wait for the disk or the object store overlaps the next
    decode instead of adding to it. At most one volume's writes wait behind the one being written, so the memory
    held stays two volumes' outputs. The process keeps its freed large buffers for the next volume
    (`reuse_large_buffers`): prepare owns the process it runs in, a Ray worker or the CLI's."""
    reuse_large_buffers()
    out = str(out_dir)
    pending: deque[tuple[dict, Future]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-writes") as writer:
        for task in tasks:
            result, writes = _prepared(task, out, settings, keep_non_chest)
            pending.append((result, writer.submit(_write, writes)))
            while len(pending) > 2 or (pending and pending[0][1].done()):
                done, future = pending.popleft()
                future.result()  # a failed write (disk full, store refused) raises here, as prepare_volume would
                yield done
        while pending:
            done, future = pending.popleft()
            future.result()
            yield done


def _write(writes: Writes) -> None:
    for location, data in writes:
        if data is None:
            storage.remove(location)
        else:  # read by training later, on this node or another: not kept in this node's page cache meanwhile
            storage.write_bytes(location, data, keep_cached=False)


def _prepared(task: VolumeTask, out: str, settings: PreprocessSettings, keep_non_chest: bool) -> tuple[dict, Writes]:
    """One volume's result and the writes that store it (its .npy, then its record; or its failure)."""
    try:
        if task.path is None:
            raise DataNotFoundError(task.volume_name, "volume file not found under the data directory")
        with local_volume(task.path) as path:
            try:
                volume = read_raw_volume(path, metadata=task.metadata)
            except DataFormatError as exc:  # name the volume as the user knows it, not the temporary copy
                raise type(exc)(task.path, exc.problem, column=exc.column, row=exc.row) from None
        if not keep_non_chest and any(note.startswith(NON_CHEST_NOTE) for note in volume.notes):
            raise UnusableContentError(task.path, "skipped: no lung field found (head CT?); --keep-non-chest keeps it")
        slices, positions = preprocess_raw_volume(volume, settings)
    except (DataFormatError, OSError, ValueError, MemoryError) as exc:
        failure = {"VolumeName": task.volume_name, "path": task.path or "", "reason": str(exc), "status": "failed"}
        return failure, [(storage.join(out, "failed", f"{task.stem}.json"), json_bytes(failure))]
    relative = f"volumes/{task.split}/{task.stem}.npy"
    buffer = io.BytesIO()
    np.save(buffer, slices, allow_pickle=False)
    record = {
        "VolumeName": task.volume_name,
        "stem": task.stem,
        "patient": task.patient,
        "split": task.split,
        "file": relative,
        "num_slices": int(slices.shape[0]),
        "slice_positions": [int(p) for p in positions],
        "source_slices": int(volume.shape[0]),
        "spacing": [float(s) for s in volume.spacing],
        "hu_source": volume.hu_source,
        "notes": "; ".join(volume.notes),
        "labels": list(task.labels),
        "status": "ok",
    }
    return record, [
        (storage.join(out, relative), buffer.getvalue()),
        (storage.join(out, "records", f"{task.stem}.json"), json_bytes(record)),  # written last: the volume is done
        (storage.join(out, "failed", f"{task.stem}.json"), None),
    ]
