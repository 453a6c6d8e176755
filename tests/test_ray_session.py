"""The embedded local Ray that `ctplatform` starts (ctplatform.ray_session.connect)."""

import os

import pytest
import ray

from ctplatform.ray_session import connect, shutdown_if

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
def niceness() -> int:
    return os.nice(0)


@ray.remote(num_cpus=0)
class Probe:
    def niceness(self) -> int:
        return os.nice(0)


def test_embedded_ray_runs_tasks_and_actors_at_the_drivers_priority():
    """Ray's default puts workers at niceness 15, where every busy process of default priority takes CPU from the
    training loop and its DataLoader workers first."""
    assert not ray.is_initialized()
    started = connect(num_cpus=1, quiet=True)
    try:
        assert started
        driver = os.nice(0)
        assert ray.get(niceness.remote()) == driver
        assert ray.get(Probe.remote().niceness.remote()) == driver
    finally:
        shutdown_if(started)
    assert not ray.is_initialized()
