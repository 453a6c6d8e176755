"""Connect to Ray: an embedded local Ray (dashboard on 127.0.0.1) by default, a cluster with `--address`.

Thin adapter shared by the Ray-facing modules (prepare, train launcher, tune, serve). What Ray 2.60 does here:
keep the dashboard on (with it off, Tune-stopped Train trials never release their CPUs in Ray 2.60); never bind
it beyond loopback by default (its Jobs API runs arbitrary code); `--gpu-device N` pins a local run to one GPU by
setting CUDA_VISIBLE_DEVICES before Ray starts, so Ray only ever sees that GPU.
"""

from __future__ import annotations

import os

import ray

# Ray starts its workers at niceness 15, below its own daemons; here the workers *are* the job, and their DataLoader
# processes inherit the niceness, so any busy process at the default priority (Ray's daemons, the driver, a
# neighbour) takes CPU from the training loop first. 2-core CPU, efficientnet_b0 32², batch 16: Ray Train at 0.78x
# the plain loop with niceness 15, 0.87x with 0 (BENCHMARKS.md). cluster.yaml and the KubeRay image set the same
# through RAY_worker_niceness.
WORKER_NICENESS = 0


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    gpu_device: int | None = None,
    dashboard_host: str = "127.0.0.1",
    quiet: bool = False,
) -> bool:
    """Start or join Ray; returns True when this call started it (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=not quiet)
        return True
    if gpu_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_device)
    # address="local" starts a fresh embedded Ray even when a `ray start` cluster runs on this machine
    # (plain ray.init() would join it silently).
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_host=dashboard_host,
        log_to_driver=not quiet,
        configure_logging=not quiet,
        _system_config={"worker_niceness": WORKER_NICENESS},
    )
    if not quiet and getattr(context, "dashboard_url", None):
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    return True


def shutdown_if(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
