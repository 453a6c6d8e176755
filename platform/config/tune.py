"""Sweep settings: the search, the scheduler and the resources of each trial."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option

SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneConfig:
    """Sweep: Optuna + ASHA over Ray Train trials"""

    space: str | None = option(None, "search space YAML (default: the packaged default_space.yaml)",
                               path="read")
    name: str = option("sweep", "sweep name: <storage-path>/<name>")
    storage_path: str = option("./runs", "runs folder or URI", path="uri")
    num_samples: int = option(8, "trials")
    max_concurrent: int = option(1, "trials at once")
    workers_per_trial: int = option(1, "Ray Train workers per trial")
    gpus_per_trial: float = option(1.0, "GPUs per trial worker; fractions share a GPU between trials")
    cpus_per_worker: float = option(1.0, "CPUs per Train worker")
    metric: str | None = option(None, "metric to optimise (default: the space file's)")
    metric_mode: str | None = option(None, "min or max (default: the space file's)", choices=("min", "max"))
    seed: int = option(0, "random seed of the sampler")
    searcher: str = option("optuna", "optuna (seeded TPE) or random", choices=SEARCHERS)
    scheduler: str = option("asha", "asha (early stopping) or fifo", choices=SCHEDULERS)
    grace_period: int = option(1, "ASHA: epochs before a trial may be stopped")
    reduction_factor: int = option(2, "ASHA: keep the best 1/reduction_factor at each rung")
    max_failures: int = option(2, "worker failures a trial survives")
    address: str | None = option(None, "Ray cluster address (default: an embedded local Ray)")
    resume: bool = option(False, "continue an interrupted sweep of this --name")
    # What each trial's thin driver (the function that runs its TorchTrainer) asks Ray for. Add a custom resource
    # only some nodes advertise (e.g. {"CPU": 0.1, "sweep_driver": 1} with `ray start --resources`) to keep the
    # drivers off the nodes whose CPUs are meant for Train workers.
    driver_resources: dict | None = option(None, "resources of each trial's driver", cli=False)
