"""Ray adapter for `prepare`: batches of volumes as Ray tasks on the local machine or a cluster (`--address`).

Each task writes its volumes' files itself (to the cache folder or the object store every node can reach), so
only the small per-volume records travel back to the driver.

Why batches: one volume takes ~50-100 ms to decode and resample; a task per volume pays Ray's per-task cost
(scheduling, argument and result transfer, ~1-5 ms on a busy 2-core machine) on every one. A batch amortises it,
while enough batches stay queued that every CPU of every node has work and the last ones finish close together.
The tasks in flight stay bounded, so a 50,000-volume job never queues every volume's arguments at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from tqdm import tqdm

from ctplatform.data.prepare import VolumeTask, prepare_volume
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.ray_session import connect, shutdown_if

MAX_BATCH = 8  # volumes per task at most: a batch's results (and its progress) arrive together


def batch_size(num_tasks: int, cpus: int) -> int:
    """Volumes per task: about four batches per CPU (so CPUs that finish early take more), 1 to MAX_BATCH."""
    return max(1, min(MAX_BATCH, num_tasks // (4 * max(1, cpus))))


def prepare_batch(tasks: list[VolumeTask], out_dir: str, settings: PreprocessSettings,
                  keep_non_chest: bool) -> list[dict]:
    return [prepare_volume(task, out_dir, settings, keep_non_chest) for task in tasks]


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
        size = batch_size(len(tasks), cpus)
        batches = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        batches.reverse()  # pop() from the end hands them out in order
        limit = 2 * cpus  # one running and one queued per CPU: no CPU waits for the driver between batches
        pending: list = []
        with tqdm(total=len(tasks), unit="vol", disable=not progress, desc="prepare") as bar:
            while batches or pending:
                while batches and len(pending) < limit:
                    pending.append(remote.remote(batches.pop(), out_dir, settings, keep_non_chest))
                done, pending = ray.wait(pending, num_returns=1)
                for result in ray.get(done[0]):
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
        return time.perf_counter() - begin
    finally:
        shutdown_if(started_here)
