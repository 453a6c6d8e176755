"""Ray Train adapter: every training run is a `TorchTrainer` running the Lightning loop on each worker.

`RayDDPStrategy` + `RayLightningEnvironment` + `RayTrainReportCallback` (Ray Train V2). Ray sets
CUDA_VISIBLE_DEVICES per worker: that is the GPU pinning. The run name is stable (derived from the training
configuration unless `--run-name` is given), and Ray Train restores a run of the same name and storage path
from its latest checkpoint: rerunning the same command resumes it; `FailureConfig` retries a failed worker group
from the latest checkpoint too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from ctplatform import storage
from ctplatform.config import TrainConfig
from ctplatform.model.backbones import check_weights
from ctplatform.ray_session import cluster_has_gpus, connect, shutdown_if

# Ray Train V2 retries a controller error (e.g. "worker group startup timed out": the workers' resources never
# came) forever by default (controller_failure_limit=-1), printing a line a minute. Bounded, the run fails with
# that error instead: a Tune trial then errors (and is retried by Tune's own FailureConfig) while the sweep goes on.
CONTROLLER_RETRIES = 2
# Ray Train restarts a failed worker group at once; waiting first (doubling, capped) gives a lost node, a slow
# autoscaler or a loaded machine time to free what the group needs, instead of failing every retry the same way.
RETRY_BACKOFF_FIRST_S = 2.0
RETRY_BACKOFF_MAX_S = 30.0  # the controller cannot be stopped while it waits: keep a Tune stop prompt

logger = logging.getLogger(__name__)

# Fields that do not change what is trained (or only extend it, like --epochs): left out of the stable run name,
# so rerunning a command, or rerunning it with more epochs, resumes the same run.
_NOT_TRAINING = {"epochs", "mode", "checkpoint", "predict_input", "predict_type", "predict_metadata", "report_dir",
                 "output", "address", "run_name", "storage_path", "max_failures", "gpu_device", "num_workers",
                 "use_gpu", "guide_checkpoints", "grad_checkpoint", "local_cache_gb"}
# Fields added after runs were named, left out of the name while they hold their defaults, so those runs' names (and
# resuming them) do not change.
_ADDED_DEFAULTS = {"lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": "auto"}


def stable_run_name(cfg: TrainConfig) -> str:
    relevant = {k: v for k, v in sorted(cfg.to_dict().items())
                if k not in _NOT_TRAINING and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.model}-{cfg.head}-{cfg.loss_type}-{digest}"


def resolved(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths (Ray workers run in other directories) and a run name."""
    return cfg.replace(slice_dir=storage.absolute(cfg.slice_dir), storage_path=storage.absolute(cfg.storage_path),
                       run_name=cfg.run_name or stable_run_name(cfg))


def local_run_dir(cfg: TrainConfig) -> str:
    """Where rank 0 writes the top-3/last.ckpt checkpoints and TensorBoard logs: the run folder, or a node-local
    folder when the storage is an object-store URI (Ray's own checkpoints go to the URI; the command uploads the
    report, bundle, settings and logs there when it ends: `upload_run_files`)."""
    if storage.is_uri(cfg.storage_path):
        return str(storage.local_work_dir("runs", cfg.storage_path, cfg.run_name))
    return str(Path(cfg.storage_path, cfg.run_name))


UPLOADED = ("config.yaml", "report", "bundle", "logs", "best_reported")


def upload_run_files(cfg: TrainConfig) -> str:
    """Copy what the driver and rank 0 wrote locally next to Ray's checkpoints under `<storage-path>/<run-name>`."""
    target = storage.join(cfg.storage_path, cfg.run_name)
    for name in UPLOADED:
        local = Path(local_run_dir(cfg), name)
        if local.exists():
            storage.upload(local, storage.join(target, name))
    return target


class LeanRayDDPStrategy(RayDDPStrategy):
    """RayDDPStrategy without the DDP costs that buy nothing.

    - A world of one is not wrapped in DistributedDataParallel (as Lightning leaves a module unwrapped outside
      fitting): with nothing to average, the wrapper still runs its reducer and one collective per gradient bucket
      each step. H200, resnet50 224² bf16, Lightning without Ray: 3,842 img/s alone, 3,483 with DDP
      for a world of one (BENCHMARKS.md).
    - Otherwise DDP is built on the current CUDA stream. Lightning builds it inside a fresh side stream; the
      gradient accumulators then belong to that stream while backward runs on the default one, so every step pays
      cross-stream synchronisation (PyTorch warns: "AccumulateGrad node's stream does not match the stream of the
      node that produced the incoming gradient"). `gradient_as_bucket_view` also saves one gradient copy per step.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(**kwargs)

    def configure_ddp(self) -> None:
        if self.world_size > 1:
            super().configure_ddp()

    def _setup_model(self, model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same Lightning loop as a plain run, with Ray's strategy and reporting."""
    from ctplatform.model.losses import class_pos_weights
    from ctplatform.train.datamodule import build_datamodule
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    cfg = TrainConfig.from_dict(loop_config["config"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)  # slices, or bags of slices for --head attention-mil
    datamodule.setup()
    pos_weight = class_pos_weights(datamodule.train_labels()).tolist() if cfg.loss_type == "bce" else None
    settings = datamodule.index.settings
    module = CTClassifierModule(cfg.to_dict(), pos_weight=pos_weight,
                                preprocess=settings.to_dict() if settings is not None else None)
    rank = ray.train.get_context().get_world_rank()
    trainer = build_trainer(
        cfg,
        loop_config["run_dir"],
        extra_callbacks=[RayTrainReportCallback(), *loop_config.get("extra_callbacks", [])],
        strategy=RayDDPStrategy() if loop_config.get("stock_ddp") else LeanRayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        enable_progress_bar=rank == 0 and loop_config.get("progress_bar", True),
    )
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, datamodule=datamodule)
        return
    with checkpoint.as_directory() as folder:  # resume: the latest checkpoint Ray Train reported
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))


class RetryBackoff(ControllerCallback):
    """Waits before each restart of a failed worker group (worker errors and controller errors alike): the first
    retry after `first_s`, each later one twice as long, at most `max_s`. Runs in the Train controller actor; a
    Ray Train internal hook (Ray is pinned to one minor version for this)."""

    def __init__(self, first_s: float = RETRY_BACKOFF_FIRST_S, max_s: float = RETRY_BACKOFF_MAX_S):
        self.first_s, self.max_s = first_s, max_s
        self.retries = 0

    def delay_s(self, retry: int) -> float:
        return min(self.max_s, self.first_s * 2 ** (retry - 1))

    def before_controller_execute_failure_decision(self, failure_decision: FailureDecision) -> None:
        if failure_decision == FailureDecision.RETRY:
            self.retries += 1

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int) -> None:
        if self.retries:
            delay = self.delay_s(self.retries)
            logger.warning("worker group retry %d: starting it again in %.0f s", self.retries, delay)
            time.sleep(delay)
        return None  # no label selector: placement as the scaling config says


def build_torch_trainer(cfg: TrainConfig, *, run_callbacks: list | None = None, progress_bar: bool = True,
                        worker_callbacks: list | None = None, checkpoint_score: tuple[str, str] = ("val_loss", "min"),
                        stock_ddp: bool = False) -> TorchTrainer:
    """The TorchTrainer for a resolved config (also used by Tune trials, with their own run name).

    `checkpoint_score` decides which Ray checkpoints are kept (3): a sweep keeps the best by its own metric, so
    the best epoch of the best trial is still there to export when the sweep ends."""
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpus()
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": local_run_dir(cfg), "progress_bar": progress_bar,
                           "extra_callbacks": list(worker_callbacks or []), "stock_ddp": stock_ddp},
        scaling_config=ScalingConfig(num_workers=cfg.ray_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=3, checkpoint_score_attribute=checkpoint_score[0],
                                               checkpoint_score_order=checkpoint_score[1]),
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=CONTROLLER_RETRIES),
            callbacks=[RetryBackoff(), *(run_callbacks or [])],
        ),
    )


@dataclass
class TrainingOutcome:
    run_name: str
    run_dir: str
    best_checkpoint: str  # a local Lightning .ckpt path (copied out of Ray storage when it is remote)
    metrics: dict


def best_lightning_checkpoint(result, run_dir: str) -> str:
    """The Lightning checkpoint of the best reported epoch (lowest val_loss) as a local file path."""
    candidates = [(m.get("val_loss", float("inf")), c) for c, m in (result.best_checkpoints or [])]
    if not candidates and result.checkpoint is not None:
        candidates = [(0.0, result.checkpoint)]
    if not candidates:
        raise RuntimeError(f"training run {run_dir} reported no checkpoint")
    _, checkpoint = min(candidates, key=lambda pair: pair[0])
    target = Path(run_dir) / "best_reported"
    checkpoint.to_directory(str(target))
    return str(target / RayTrainReportCallback.CHECKPOINT_NAME)


def run_training(cfg: TrainConfig, *, on_start: Callable[[TrainConfig], Any] | None = None) -> TrainingOutcome:
    """Train through Ray Train on the embedded local Ray (or the cluster at `cfg.address`).

    `on_start(cfg)` runs once the settings are checked, before Ray starts (the CLI records the run's settings)."""
    cfg = resolved(cfg)
    if cfg.address is None:  # the local workers see this machine's files and torch cache: fail before starting Ray
        check_weights(cfg.model, cfg.weights)
    if on_start is not None:
        on_start(cfg)
    started = connect(cfg.address, gpu_device=cfg.gpu_device)
    try:
        result = build_torch_trainer(cfg).fit()
        run_dir = local_run_dir(cfg)
        if result.error is not None:
            raise RuntimeError(f"training run {cfg.run_name} failed: {result.error}")
        return TrainingOutcome(cfg.run_name, run_dir, best_lightning_checkpoint(result, run_dir),
                               dict(result.metrics or {}))
    finally:
        shutdown_if(started)
