"""Where the work runs: the GPU of a local run, and the Ray cluster and resources of a distributed one."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


@dataclass
class DeviceConfig:
    """Device"""

    gpu_device: int | None = option(None, "pin a single-GPU local run to GPU N")


@dataclass
class RayConfig:
    """Ray: the cluster, Train workers and where runs are stored"""

    address: str | None = option(None, "Ray cluster address (default: an embedded local Ray)")
    ray_workers: int = option(1, "Ray Train workers (DDP processes; --num-workers stays DataLoader workers)")
    gpus_per_worker: float = option(1.0, "GPUs per Train worker")
    cpus_per_worker: float = option(1.0, "CPUs per Train worker")
    use_gpu: bool | None = option(None, "train on CPUs even where GPUs exist", flag="--cpu", const=False)
    storage_path: str = option("./runs", "runs folder or URI", path="uri")
    run_name: str | None = option(None, "run name (default: derived from the training settings, stable, so a "
                                        "rerun resumes)")
    max_failures: int = option(2, "worker failures a run survives (it resumes from its last checkpoint)")
