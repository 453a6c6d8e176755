"""Ray adapter for `prepare`: batches of volumes as Ray tasks on the local machine or a cluster (`--address`).

Each task writes its volumes' files itself (to the cache folder or the object store every node can reach), so
only the small per-volume records travel back to the driver.

Why batches: one volume takes ~50-100 ms to decode and resample; a task per volume pays Ray's per-task cost
(scheduling, argument and result transfer, the driver's round trip) on every one. A batch amortises it,
while the batches shrink towards the end of the job, so every CPU of every node has work until the last volumes.
The tasks in flight stay bounded, so a 50,000-volume job never queues every volume's arguments at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from tqdm import tqdm

from ctplatform.data.prepare_worker import VolumeTask, prepare_volumes
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.ray_session import connect, shutdown_if

MAX_BATCH = 8  # volumes per task at most: a batch's results (and its progress) arrive together


def batch_size(remaining: int, cpus: int) -> int:
    """Volumes in the next task: a quarter of each CPU's share of the volumes still to hand out, 1 to MAX_BATCH.
    The batches shrink as the job runs out of work, so the last ones are single volumes and no CPU sits idle
    while another finishes a long batch."""
    return max(1, min(MAX_BATCH, remaining // (4 * max(1, cpus))))


def prepare_batch(tasks: list[VolumeTask], out_dir: str, settings: PreprocessSettings,
                  keep_non_chest: bool) -> list[dict]:
    """One task's volumes; its writes overlap the decoding of the next volume (`prepare_volumes`)."""
    return list(prepare_volumes(tasks, out_dir, settings, keep_non_chest))


def prepare_with_ray(
    tasks: list[VolumeTask],
    out_dir: str,
    settings: PreprocessSettings,
    keep_non_chest: bool,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> float:
    """Prepare `tasks` as Ray tasks; returns the seconds spent processing, from the first task's submission to
    the last result: the workers' start (their imports) is included, Ray's own start-up (`ray.init`) is not."""
    started_here = connect(address, num_cpus=workers, quiet=not progress)
    try:
        begin = time.perf_counter()
        remote = ray.remote(num_cpus=1, max_retries=1)(prepare_batch)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        limit = 2 * cpus  # one running and one queued per CPU: no CPU waits for the driver between batches
        pending: list = []
        handed_out = 0
        with tqdm(total=len(tasks), unit="vol", disable=not progress, desc="prepare") as bar:
            while handed_out < len(tasks) or pending:
                while handed_out < len(tasks) and len(pending) < limit:
                    size = batch_size(len(tasks) - handed_out, cpus)
                    batch = tasks[handed_out : handed_out + size]
                    handed_out += size
                    pending.append(remote.remote(batch, out_dir, settings, keep_non_chest))
                done, pending = ray.wait(pending, num_returns=1)
                for result in ray.get(done[0]):
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
        return time.perf_counter() - begin
    finally:
        shutdown_if(started_here)
