"""Ray adapter for `prepare`: one task per volume on the local machine or a cluster (`--address`).

On a cluster the cache folder must be storage every node can write (a shared file system): each task writes its
volume's files itself, so only small records travel back to the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from tqdm import tqdm

from ctplatform.data.prepare import VolumeTask, prepare_volume
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.ray_session import connect, shutdown_if


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
    """Prepare `tasks` as Ray tasks; returns the seconds spent processing (Ray's start-up excluded)."""
    started_here = connect(address, num_cpus=workers, quiet=not progress)
    try:
        begin = time.perf_counter()
        remote = ray.remote(num_cpus=1, max_retries=1)(prepare_volume)
        # Bound the tasks in flight so a 50,000-volume job does not queue 50,000 tasks' arguments at once.
        limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: list = []
        queue = list(tasks)
        with tqdm(total=len(tasks), unit="vol", disable=not progress, desc="prepare") as bar:
            while queue or pending:
                while queue and len(pending) < limit:
                    pending.append(remote.remote(queue.pop(0), out_dir, settings, keep_non_chest))
                done, pending = ray.wait(pending, num_returns=1)
                for result in ray.get(done):
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
        return time.perf_counter() - begin
    finally:
        shutdown_if(started_here)
