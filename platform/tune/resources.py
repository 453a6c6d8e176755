"""How many trials of a sweep can run at once on the cluster, so that none waits for Train workers forever.

A trial is a thin driver (`driver_resources`, 0.1 CPU by default) that starts its own Ray Train worker group. Tune
schedules the driver only; if more drivers start than the cluster has room for their workers, a worker group waits
for resources that other trials hold (Ray Train's controller times out and retries). Capping the concurrent trials
to what fits makes every started trial's workers placeable once the trials before it have released theirs.
"""

from __future__ import annotations

import math
import sys

import ray


def trial_demand(driver: dict[str, float], workers: int, cpus_per_worker: float, gpus_per_worker: float,
                 use_gpu: bool) -> dict[str, float]:
    """Resources one trial holds while it trains: its driver plus its Train workers."""
    demand = dict(driver)
    demand["CPU"] = demand.get("CPU", 0.0) + workers * cpus_per_worker
    if use_gpu:
        demand["GPU"] = demand.get("GPU", 0.0) + workers * gpus_per_worker
    return {name: amount for name, amount in demand.items() if amount > 0}


def trials_that_fit(demand: dict[str, float], available: dict[str, float]) -> int:
    """How many trials of `demand` the `available` resources hold at once."""
    return min(math.floor(available.get(name, 0.0) / amount + 1e-9) for name, amount in demand.items())


def _text(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))


def resources_note(demand: dict[str, float]) -> str:
    """What one trial holds and what the cluster has, for a trial that waited for its workers."""
    cluster = {name: float(amount) for name, amount in ray.cluster_resources().items()}
    return f"a trial holds {_text(demand)}; the cluster has {_text({n: cluster.get(n, 0.0) for n in demand})}"


def concurrent_trials(demand: dict[str, float], requested: int, *, fixed_cluster: bool) -> int:
    """`requested` capped by what the cluster holds now.

    On a fixed cluster (the embedded local Ray) a trial that cannot fit at all is an error before anything starts;
    on a remote cluster an autoscaler may still add nodes, so there it is a warning and the request stands."""
    cluster = {name: float(amount) for name, amount in ray.cluster_resources().items()}
    fit = trials_that_fit(demand, cluster)
    if fit >= 1:
        if fit < requested:
            print(f"running at most {fit} trial(s) at once (asked {requested}): each holds {_text(demand)}, the "
                  f"cluster has {_text({n: cluster.get(n, 0.0) for n in demand})}", file=sys.stderr, flush=True)
        return max(1, min(requested, fit))
    message = (f"one trial needs {_text(demand)} (its driver and its Train workers) but the cluster has "
               f"{_text({n: cluster.get(n, 0.0) for n in demand})}: lower --workers-per-trial, --cpus-per-worker or "
               f"--gpus-per-trial, or add nodes")
    if fixed_cluster:
        raise ValueError(message)
    print(f"warning: {message}; trials wait until the autoscaler adds them", file=sys.stderr, flush=True)
    return requested
