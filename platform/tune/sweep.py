"""Ray Tune adapter: Optuna (`tune/study.py`) + ASHA over Ray Train trials.

Each trial is a function that builds and fits a `TorchTrainer` named after the trial id, with Tune's
`TuneReportCallback` in the Train run config (Ray 2.60's pattern for Tune over Train V2), so one trial may itself
use several GPUs. Where a sweep writes what: `tune/layout.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import optuna
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ctplatform import storage
from ctplatform.config import TrainConfig
from ctplatform.config.tune import TuneConfig
from ctplatform.model.backbones import check_weights
from ctplatform.ray_session import cluster_has_gpus, connect, shutdown_if
from ctplatform.train.ray_launcher import build_torch_trainer, resolved
from ctplatform.tune.layout import COMPLETE_FILE, HISTORY_FILE, STUDY_FILE, sweep_folder, workspace_folder
from ctplatform.tune.mirror import STUDY_FILES, StudyMirror, mirror_to_uri
from ctplatform.tune.resources import concurrent_trials, resources_note, trial_demand
from ctplatform.tune.space import SearchSpace
from ctplatform.tune.study import build_searcher
from ctplatform.tune.summary import LiveTrialsTable, write_summary


class RecordingTuneReportCallback(TuneReportCallback):
    """Tune's report callback that also appends each report to the trial's run folder.

    Tune snapshots its experiment state every few seconds, so a driver killed just after a trial finished can
    restore that trial as unfinished and start it again. The trial then replays its recorded reports instead of
    losing them, and trains only what is missing (Ray Train resumes from the latest checkpoint)."""

    def __init__(self, history_path: str | None):
        super().__init__()
        self.history_path = history_path

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, metrics, checkpoint)
        if self.history_path is not None:
            record = dict(metrics[0])
            if checkpoint:
                record["checkpoint_path"] = checkpoint.path
            line = json.dumps(record, default=float) + "\n"
            if storage.is_uri(self.history_path):  # an object cannot be appended to: write it whole again
                before = storage.read_text(self.history_path) if storage.is_file(self.history_path) else ""
                storage.write_bytes(self.history_path, (before + line).encode())
            else:
                with open(self.history_path, "a") as handle:
                    handle.write(line)


def run_trial(config: dict, base: dict, trials_dir: str, metric: str, mode: str, worker_callbacks=None) -> None:
    """One Tune trial: a Ray Train run named after the trial id (stable across `--resume`)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = TrainConfig.from_dict(base).replace(**config, run_name=f"trial_{trial_id}", storage_path=trials_dir,
                                              guide_checkpoints=False)  # Ray's checkpoints suffice (disk)
    cfg = resolved(cfg.validate())
    run_dir = storage.join(cfg.storage_path, cfg.run_name)  # beside Ray's checkpoints: a folder or a URI
    history = storage.join(run_dir, HISTORY_FILE)
    if storage.is_file(history):
        for line in storage.read_text(history).splitlines():  # a restarted trial: replay what it already reported
            tune.report(json.loads(line))
        if storage.is_file(storage.join(run_dir, COMPLETE_FILE)):
            return
    if not storage.is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    callback = RecordingTuneReportCallback(history)
    trainer = build_torch_trainer(cfg, run_callbacks=[callback], progress_bar=False,
                                  worker_callbacks=worker_callbacks, checkpoint_score=(metric, mode))
    trainer.fit()
    storage.write_bytes(storage.join(run_dir, COMPLETE_FILE), b"complete\n")


def _scheduler(space: SearchSpace, settings: TuneConfig, max_epochs: int):
    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", metric=space.metric, mode=space.mode, max_t=max_epochs,
                             grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    raise ValueError(f"invalid scheduler {settings.scheduler!r}: choose asha or fifo")


def run_sweep(base: TrainConfig, space: SearchSpace, settings: TuneConfig, *, resume: bool = False,
              export_best: bool = True, worker_callbacks: list | None = None, tune_verbosity: int = 1) -> dict:
    """Run (or resume) a sweep; returns a summary with the best trial and where everything was written.

    `tune_verbosity` is Ray Tune's (0: only this module's one line per finished trial and the summary)."""
    if settings.address is None:  # local trials see this machine's files and torch cache: fail before writing anything
        for model in space.params.get("model", {}).get("choices", [base.model]):
            check_weights(model, base.weights)
    sweep_dir, workspace = sweep_folder(settings), workspace_folder(settings)
    Path(workspace).mkdir(parents=True, exist_ok=True)
    if resume and storage.is_uri(sweep_dir) and not Path(workspace, STUDY_FILE).is_file():
        for name in STUDY_FILES:  # a driver on another machine: the study as last mirrored (`study` mends its age)
            if storage.is_file(storage.join(sweep_dir, name)):
                storage.download(storage.join(sweep_dir, name), Path(workspace, name))
    base = base.replace(ray_workers=settings.workers_per_trial, gpus_per_worker=settings.gpus_per_trial,
                        cpus_per_worker=settings.cpus_per_worker, max_failures=settings.max_failures,
                        slice_dir=storage.absolute(base.slice_dir))
    started = connect(settings.address)
    try:
        driver = settings.driver_resources or {"CPU": 0.1}
        use_gpu = base.use_gpu if base.use_gpu is not None else cluster_has_gpus()
        demand = trial_demand(driver, settings.workers_per_trial, settings.cpus_per_worker, settings.gpus_per_trial,
                              use_gpu)
        max_concurrent = concurrent_trials(demand, settings.max_concurrent, fixed_cluster=settings.address is None)
        trainable = tune.with_resources(  # the trial driver needs little; Train workers ask for their own
            tune.with_parameters(run_trial, base=base.to_dict(), trials_dir=f"{sweep_dir}/trials",
                                 metric=space.metric, mode=space.mode, worker_callbacks=worker_callbacks),
            driver,
        )
        table = LiveTrialsTable(Path(workspace) / "trials.csv", space, base.epochs)
        mirror = [StudyMirror(workspace, sweep_dir)] if storage.is_uri(sweep_dir) else []
        with _tune_output(quiet=tune_verbosity == 0):  # from the searcher's study on: Optuna logs there
            if resume:
                if not tune.Tuner.can_restore(sweep_dir):
                    raise ValueError(f"--resume: no sweep to resume at {sweep_dir}")
                tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
            else:
                if tune.Tuner.can_restore(sweep_dir):
                    raise ValueError(f"a sweep named {settings.name!r} exists at {sweep_dir}: pass --resume to "
                                     "continue it, or choose another --name")
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(search_alg=build_searcher(space, settings, max_concurrent),
                                                scheduler=_scheduler(space, settings, base.epochs),
                                                num_samples=settings.num_samples, reuse_actors=False),
                    run_config=tune.RunConfig(name=settings.name, storage_path=str(Path(sweep_dir).parent)
                                              if not storage.is_uri(sweep_dir) else settings.storage_path,
                                              failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                              callbacks=[table, *mirror, CSVLoggerCallback(), JsonLoggerCallback()],
                                              verbose=tune_verbosity),
                )
            begin = time.perf_counter()
            results = tuner.fit()
        summary = write_summary(results, space, base.epochs, workspace, settings,
                                resources_note=resources_note(demand))
        summary.update(sweep_dir=sweep_dir, workspace=workspace, seconds=round(time.perf_counter() - begin, 1))
        if summary.get("best_checkpoint"):
            summary["best_checkpoint"] = storage.with_scheme(summary["best_checkpoint"], sweep_dir)
        if export_best and summary.get("best_checkpoint"):
            summary.update(export_best_bundle(summary["best_checkpoint"], base.slice_dir, workspace))
        if storage.is_uri(sweep_dir):
            summary["mirrored"] = mirror_to_uri(workspace, sweep_dir)
            for key, name in (("best_bundle", "best"), ("best_report", "best/report/report.html")):
                if summary.get(key):  # where the results are kept (the workspace copy is this node's only)
                    summary[key] = storage.join(sweep_dir, name)
        return summary
    finally:
        shutdown_if(started)


@contextlib.contextmanager
def _tune_output(quiet: bool):
    """What Tune prints while it runs, set for the duration of `fit()` only.

    Tune's own result loggers: CSV and JSON (trial results, which `Result.metrics_dataframe` reads) but not its
    TensorBoard copy of them, which it writes into Ray's temporary session folder and then advertises; the trials'
    TensorBoard logs are Lightning's, in each trial's run folder. `quiet`: Tune's newer output engine prints its
    experiment table even at verbosity 0, the older one prints nothing there; Optuna's INFO lines (a study
    created, each trial finished) are left out too. Warnings and errors of both still show."""
    saved = {name: os.environ.get(name) for name in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT")}
    optuna_level = optuna.logging.get_verbosity()
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if quiet:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(optuna_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def export_best_bundle(checkpoint_dir: str, slice_dir: str, workspace: str) -> dict:
    """Evaluate the best epoch's checkpoint (a folder or a URI) and export it as `<workspace>/best` (bundle +
    report)."""
    from ctplatform.evaluation.evaluate import evaluate

    best_dir = Path(workspace) / "best"
    with contextlib.ExitStack() as stack:
        local = checkpoint_dir
        if storage.is_uri(checkpoint_dir):  # a URI with its scheme (Ray's checkpoint_path metric has none: run_sweep)
            # as_directory removes its download afterwards (to_directory would leave the checkpoint in /tmp)
            local = stack.enter_context(ray.train.Checkpoint(checkpoint_dir).as_directory())
        metrics = evaluate(os.path.join(local, "checkpoint.ckpt"), slice_dir, best_dir / "report",
                           bundle_dir=best_dir)
    return {"best_bundle": str(best_dir), "best_report": str(best_dir / "report" / "report.html"),
            "best_validation_macro_auroc": metrics["macro"]["auroc"]}
