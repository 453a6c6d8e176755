"""Data preparation and synthetic data settings."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option

SELECTIONS = ("even", "stride")
PRESETS = ("realistic", "easy")  # ctplatform.data.synthetic.presets (config sits below data in the layering)


@dataclass
class PrepareConfig:
    """Preparation: volumes -> a resumable slice cache"""

    data_dir: str = option("./ct_rate_data", "CT-RATE folder or URI", path="uri")
    out: str = option("./ct_rate_2d", "cache folder or URI (what training calls --slice-dir)",
                          path="uri")
    image_size: int = option(224, "slice side after resizing")
    selection: str = option("even", "even: --num-slices evenly spaced within the body; stride: every --stride-th "
                                    "slice", choices=SELECTIONS)
    num_slices: int = option(32, "K for --selection even")
    stride: int = option(4, "k for --selection stride")
    address: str | None = option(None, "Ray cluster address (default: a local Ray)")
    workers: int | None = option(None, "local Ray CPUs (default: all cores)")
    no_ray: bool = option(False, "prepare in this process, one volume at a time")
    keep_non_chest: bool = option(False, "keep volumes with no lung field (head CTs)")
    legacy_layout: bool = option(False, "also write slices/{split}/*.npy and splits/{split}_slices.csv, the layout "
                                        "of the original run_task2.py scripts")


@dataclass
class SyntheticDataConfig:
    """Synthetic CT-RATE-shaped data"""

    out: str | None = option(None, "output folder or URI", required=True, path="write")
    volumes: int = option(120, "number of volumes")
    size: str = option("64x64x48", "ROWSxCOLSxSLICES (real scans: 512x512x300)")
    seed: int = option(0, "random seed")
    workers: int = option(1, "processes drawing scans in parallel; the files are the same for any value")
    preset: str = option("realistic", "realistic: findings as subtle and local as in real CT, at CT-RATE's "
                                      "prevalence; easy: one chest for all, each finding through the whole "
                                      "scan at its own density (what the demo learns from; far easier than CT)",
                         choices=PRESETS)


@dataclass
class DemoConfig:
    """Demo"""

    workdir: str = option("demo_run", "folder for the data, cache, sweep and bundle (local)", path="uri")
    volumes: int = option(1200, "synthetic volumes")
    preset: str = option("easy", "synthetic data preset (see demo-data --preset)", choices=PRESETS)
    trials: int = option(2, "sweep trials")
    epochs: int = option(6, "epochs per trial")
    no_serve: bool = option(False, "stop after exporting the best bundle")
    verbose: bool = option(False, "show Ray's, Tune's and every worker's full logs (default: one line per step and "
                                  "per finished trial)")
