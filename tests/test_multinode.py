"""Fault injection on a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: one raylet per node).

Laid out like cluster.yaml: the sweep's driver joins the head, Ray Train workers need a worker node's CPU. A node
killed mid-sweep (its raylet and every process on it SIGKILLed, as when a cloud VM disappears) must cost only the
epochs since the last checkpoint; a Serve replica killed under load must cost (almost) no request.

Run with the Ray lock held: `flock /tmp/ray-tests.lock .venv/bin/pytest tests/test_multinode.py`.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections import defaultdict

import httpx
import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from ctplatform.config import TrainConfig
from ctplatform.config.tune import TuneConfig
from ctplatform.tune.space import SearchSpace
from ctplatform.tune.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

# Dead nodes are noticed within ~2 s instead of Ray's default ~15 s (health checks every 3 s, 5 misses).
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


def start_cluster(head_cpus: int, worker_cpus: list[int], head_resources: dict | None = None
                  ) -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "resources": head_resources or {}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "_system_config": FAST_FAILURE_DETECTION})
    workers = [cluster.add_node(num_cpus=cpus) for cpus in worker_cpus]
    cluster.wait_for_nodes()
    return cluster, workers


def stop_cluster(cluster: Cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


# ----------------------------------------------------------------------------------------------- sweep
def test_sweep_spreads_over_nodes_and_survives_losing_one(tiny_cache, tmp_path, s3_bucket, monkeypatch):
    """No shared file system: the slice cache and the sweep's storage are in a bucket on the S3-protocol test
    server (the nodes get its AWS_* environment when they start, as cluster.yaml's nodes get their credentials),
    and each node reads the cache through its own local copy."""
    from ctplatform import storage
    from ctplatform.train.lightning_import import pl

    monkeypatch.setenv("CTPLATFORM_CACHE_DIR", str(tmp_path / "node-copies"))
    storage.upload(tiny_cache, f"{s3_bucket}/cache")

    starts = tmp_path / "epoch-starts"

    class RecordPlacement(pl.Callback):
        """Each Train worker notes (its run, its node, the epoch it starts)."""

        def on_train_epoch_start(self, trainer, module):
            run = ray.train.get_context().get_experiment_name()
            node = ray.get_runtime_context().get_node_id()
            with open(starts, "a") as handle:
                handle.write(f"{run} {node} {trainer.current_epoch}\n")

    def placements() -> list[tuple[str, str, int]]:
        if not starts.is_file():
            return []
        return [(run, node, int(epoch)) for run, node, epoch in
                (line.split() for line in starts.read_text().splitlines() if line.count(" ") == 2)]

    def checkpoint_registered(run: str) -> bool:  # Train's controller has recorded an epoch's checkpoint
        history = f"{s3_bucket}/runs/mn/trials/{run}/tune_reports.jsonl"
        return storage.is_file(history) and "checkpoint_path" in storage.read_text(history)

    # head: the trials' thin drivers (0.1 CPU each, pinned there by a custom resource); three worker nodes of 1 CPU
    # each, so each fits exactly one Train worker: both trials at once, and headroom for the one that loses its node
    # (Ray's cluster_utils cannot add a node from a thread, which is where the node is killed)
    cluster, workers = start_cluster(head_cpus=1, worker_cpus=[1, 1, 1], head_resources={"sweep_driver": 10})
    by_id = {node.node_id: node for node in workers}
    killed: dict = {}
    stop = threading.Event()

    def kill_a_busy_worker_node():
        """Once two trials train at the same time, kill the node of one that has a checkpoint, mid-epoch 1."""
        while not stop.is_set():
            seen = placements()
            running = {run: node for run, node, _ in seen}
            if len(running) >= 2:
                for run, node, epoch in reversed(seen):
                    if epoch == 1 and node in by_id and checkpoint_registered(run):
                        killed.update(run=run, node=node, concurrent=dict(running))
                        cluster.remove_node(by_id[node], allow_graceful=False)
                        return
            time.sleep(0.2)

    space = SearchSpace(metric="val_loss", mode="min", params={
        "learning_rate": {"type": "categorical", "choices": [0.003, 0.0003]}})
    # timm's resnet10t: its checkpoints, uploaded each epoch to the test server, are a fifth of resnet50's
    config = TrainConfig(slice_dir=f"{s3_bucket}/cache", model="resnet10t", batch_size=16, epochs=3, num_workers=0,
                         use_gpu=False, limit_train_batches=4, seed=0).validate()
    killer = threading.Thread(target=kill_a_busy_worker_node, daemon=True)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        killer.start()
        settings = TuneConfig(name="mn", storage_path=f"{s3_bucket}/runs", num_samples=2, max_concurrent=2,
                                 cpus_per_worker=1, scheduler="fifo", seed=0,
                                 driver_resources={"CPU": 0.1, "sweep_driver": 1})
        summary = run_sweep(config, space, settings, export_best=False, worker_callbacks=[RecordPlacement()])
    finally:
        stop.set()
        killer.join(30)
        stop_cluster(cluster)

    assert killed, f"the node was never killed; placements: {placements()}"
    # trials spread: the two trials running together trained on the two different worker nodes
    assert len(set(killed["concurrent"].values())) == 2, killed
    # every trial finished, none errored
    trials = pd.read_csv(io.BytesIO(storage.read_bytes(f"{summary['sweep_dir']}/summary/trials.csv")))
    assert len(trials) == 2 and set(trials["state"]) == {"finished"} and summary["errors"] == 0, trials
    assert (trials["epochs"] == 3).all(), trials
    # the trial on the lost node resumed from its checkpoint on another node: epoch 0 trained once, epoch 1 twice
    epochs_by_run = defaultdict(list)
    nodes_by_run = defaultdict(list)
    for run, node, epoch in placements():
        epochs_by_run[run].append(epoch)
        nodes_by_run[run].append(node)
    victim = killed["run"]
    assert epochs_by_run[victim].count(0) == 1 and epochs_by_run[victim].count(1) == 2, epochs_by_run[victim]
    assert nodes_by_run[victim][-1] != killed["node"]
    for run, epochs in epochs_by_run.items():  # the other trial never repeated an epoch
        if run != victim:
            assert sorted(epochs) == [0, 1, 2], (run, epochs)


# ----------------------------------------------------------------------------------------------- serve
def test_serve_replica_killed_under_load_costs_under_one_percent(tmp_path):
    from local_server import free_port
    from ray import serve
    from ray.util.state import list_actors
    from serve_payloads import chest, make_bundle, npy
    from serve_service import AUTH, app_config

    from ctplatform.serve.app import build_app

    bundle = make_bundle(tmp_path / "bundle", seed=0)
    # head: no CPU (controller and HTTP proxy only); each worker node fits one model and one ingress replica
    cluster, _ = start_cluster(head_cpus=0, worker_cpus=[1, 1])
    port = free_port()
    log: list[tuple[int | None, float]] = []
    stop = threading.Event()
    one_slice = npy(chest(seed=5)[20])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        # one HTTP proxy: every "node" here shares 127.0.0.1, so a proxy per node would fight over the port
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port,
                                                             "request_timeout_s": 30})
        config = app_config(bundle, model_replicas=2, ingress_replicas=2, max_ongoing=8, max_queued=64)
        serve.run(build_app(config), name="ctplatform", route_prefix="/")
        models = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                  if "ModelServer" in a.class_name]
        assert len(models) == 2 and len({a.node_id for a in models}) == 2, models  # one replica per worker node

        def client_loop():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                while not stop.is_set():
                    begin = time.monotonic()
                    try:
                        status = client.post("/v1/predict/slices", files={"files": ("s.npy", one_slice)},
                                             headers=AUTH).status_code
                    except httpx.HTTPError:
                        status = None
                    log.append((status, time.monotonic() - begin))

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        while len(log) < 100:
            time.sleep(0.1)
        victim = models[0]
        os.kill(victim.pid, signal.SIGKILL)  # same machine: the replica's worker process, SIGKILLed mid-batch
        killed_at = len(log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(log) < killed_at + 500 or not replaced(victim.actor_id)):
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        assert replaced(victim.actor_id), "Serve did not replace the killed replica"
    finally:
        stop.set()
        serve.shutdown()
        stop_cluster(cluster)

    statuses = [status for status, _ in log]
    success = statuses.count(200) / len(statuses)
    after = statuses[killed_at:]
    print(f"{len(statuses)} requests, {success:.2%} succeeded; failures: "
          f"{[s for s in statuses if s != 200]}; slowest {max(t for _, t in log):.1f} s")
    assert len(after) >= 500 and success >= 0.99
    assert max(t for _, t in log) < 30  # none waited for the request timeout


def replaced(dead_actor_id: str) -> bool:
    """Two live model replicas again, neither of them the killed one."""
    from ray.util.state import list_actors

    alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True) if "ModelServer" in a.class_name]
    return len(alive) == 2 and all(a.actor_id != dead_actor_id for a in alive)
