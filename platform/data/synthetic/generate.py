"""Generating a synthetic CT-RATE data set: plan the volumes, draw each scan (in worker processes if asked) and
write its reconstructions, then the labels and metadata CSVs.

Everything is numpy and deterministic: each patient's content comes from random streams keyed by (seed,
patient), so the same arguments give byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ctplatform.data.synthetic.anatomy import synthesize_scan
from ctplatform.data.synthetic.cohort import Volume, plan_volumes
from ctplatform.data.synthetic.layout import stale_volumes, volume_relpath, write_tables, write_volume
from ctplatform.data.synthetic.presets import Preset, get_preset
from ctplatform.data.synthetic.scanner import reconstruct, scan_metadata
from ctplatform.data.synthetic.size import check_size


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_dataset` wrote. Volume names include `.nii.gz`, as in the CSVs."""

    out_dir: Path
    dataset_dir: Path
    size: tuple[int, int, int]  # (rows, cols, slices)
    seed: int
    num_volumes: int
    num_train_volumes: int
    num_valid_volumes: int
    num_train_patients: int
    num_valid_patients: int
    num_fixed_volumes: int
    labels_csv: Mapping[str, Path]  # split ("train", "valid") -> path
    metadata_csv: Mapping[str, Path]
    volume_paths: Mapping[str, Path] = field(repr=False)  # volume name -> file
    # volume name -> {finding: (first, last) slice index along the file's z axis, inclusive}; not written to disk
    finding_slices: Mapping[str, Mapping[str, tuple[int, int]]] = field(repr=False)
    fixed_volumes: tuple[str, ...] = field(repr=False)  # names stored in the `_fixed` trees
    nan_affine_volume: str | None = None  # the train volume whose affine is all NaN


def generate_dataset(
    out_dir: str | os.PathLike,
    num_volumes: int = 120,
    size: tuple[int, int, int] = (64, 64, 48),
    seed: int = 0,
    valid_fraction: float = 0.25,
    fixed_fraction: float = 0.5,
    workers: int = 1,
    preset: str = "realistic",
    progress: bool = False,
) -> SyntheticSummary:
    """Write a CT-RATE-shaped data set of `num_volumes` volumes of `size` (rows, cols, slices) under `out_dir`.

    The same arguments always give byte-identical files, whatever `workers` (processes drawing scans in parallel:
    each scan's content depends only on the seed and its patient). Patients are split train/valid by patient
    (`valid_fraction` of them, at least 2); about `fixed_fraction` of the patients of each split are stored in the
    `_fixed` trees. Existing files of an earlier run are overwritten; volume files under the split trees that
    this run would not write are an error (mixing two data sets silently would corrupt both). `preset`: see
    ``presets``. `progress`: a progress bar on stderr (for a terminal).
    """
    size = check_size(tuple(size))
    chosen = get_preset(preset)
    if int(num_volumes) != num_volumes or num_volumes < 3:
        raise ValueError(f"num_volumes must be an int >= 3 (a train and two valid patients); got {num_volumes!r}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1); got {valid_fraction}")
    if not 0 <= fixed_fraction <= 1:
        raise ValueError(f"fixed_fraction must be in [0, 1]; got {fixed_fraction}")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    out = Path(out_dir)
    root = out / "dataset"
    plan = plan_volumes(int(num_volumes), int(seed), float(valid_fraction), float(fixed_fraction),
                        chosen.prevalence)
    stale = stale_volumes(root, {volume_relpath(v) for v in plan})
    if stale:
        raise FileExistsError(
            f"{root} holds {len(stale)} volume(s) that are not part of this data set (e.g. {stale[0]}); "
            "use an empty directory"
        )
    train = [v for v in plan if v.split == "train"]
    nan_pick = next((v for v in train if v.patient == 2), train[0])
    scans: dict[tuple[int, int], list[Volume]] = {}  # the reconstructions of one scan share its drawing
    for vol in plan:
        scans.setdefault((vol.key, vol.scan_index), []).append(vol)
    write_scan = functools.partial(_write_scan, seed, size, root, nan_pick.name, chosen)
    if workers > 1 and len(scans) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn: the caller may hold threads (Ray, torch) that a forked child would inherit half-copied
        with ProcessPoolExecutor(min(int(workers), len(scans)), mp_context=get_context("spawn")) as pool:
            groups = pool.map(write_scan, scans.values(), chunksize=8)
            written = [w for group in _bar(groups, len(scans), progress) for w in group]
    else:
        written = [w for group in _bar(map(write_scan, scans.values()), len(scans), progress) for w in group]
    # in plan order: a patient's scans and reconstructions are consecutive
    labels_csv, metadata_csv = write_tables(root, [(vol, meta) for vol, _, _, meta in written])
    return SyntheticSummary(
        out_dir=out,
        dataset_dir=root,
        size=size,
        seed=int(seed),
        num_volumes=len(plan),
        num_train_volumes=len(train),
        num_valid_volumes=len(plan) - len(train),
        num_train_patients=len({v.key for v in train}),
        num_valid_patients=len({v.key for v in plan if v.split == "valid"}),
        num_fixed_volumes=sum(v.fixed for v in plan),
        labels_csv=labels_csv,
        metadata_csv=metadata_csv,
        volume_paths={vol.name: path for vol, path, _, _ in written},
        finding_slices={vol.name: extent for vol, _, extent, _ in written},
        fixed_volumes=tuple(v.name for v in plan if v.fixed),
        nan_affine_volume=nan_pick.name,
    )


def _bar(items, total: int, show: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, unit="scan", desc="synthetic data", disable=not show)


def _write_scan(seed: int, size: tuple[int, int, int], root: Path, nan_affine_name: str, preset: Preset,
                volumes: list[Volume]) -> list[tuple[Volume, Path, dict[str, tuple[int, int]], dict]]:
    """Draw one scan and write each of its reconstructions; returns (volume, path, finding extents, metadata)."""
    clean, extents = synthesize_scan(seed, volumes[0].key, volumes[0].scan_index, size, volumes[0].labels,
                                      preset)
    written = []
    for vol in volumes:
        hu = reconstruct(clean, seed, vol.key, vol.scan_index, vol.recon)
        geometry, meta = scan_metadata(seed, vol, size)
        path = write_volume(root, vol, hu, geometry, nan_affine=vol.name == nan_affine_name)
        written.append((vol, path, dict(extents), meta))
    return written
