"""`ctplatform` command line: data, training, evaluation, prediction, tuning and serving.

Every command's flags are generated from its typed settings (`ctplatform.config.commands`); each command takes
`--config FILE.yaml` and `--print-config`. Heavy imports (torch, Ray, Lightning) happen inside each command, so
`ctplatform --help` is instant and a data command never starts Ray unless it runs on Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ctplatform.config import TrainConfig
from ctplatform.config.cli_args import add_config_arguments, resolve, to_yaml
from ctplatform.config.commands import COMMAND_CONFIGS, RunCommand, every_setting_name
from ctplatform.config.options import project
from ctplatform.config.tune import TuneConfig
from ctplatform.data.errors import DataFormatError, cli_prefix
from ctplatform.serve import cli as serve_cli

RUN_CONFIG_FILE = "config.yaml"


def cmd_demo_data(cfg) -> int:
    from ctplatform.data.synthetic import generate_dataset, parse_size

    summary = generate_dataset(cfg.out, num_volumes=cfg.volumes, size=parse_size(cfg.size), seed=cfg.seed,
                               workers=cfg.workers, preset=cfg.preset)
    print(f"synthetic CT-RATE data set: {summary}")
    return 0


def cmd_prepare(cfg) -> int:
    from ctplatform.data.prepare import run_prepare
    from ctplatform.data.preprocess import PreprocessSettings

    settings = PreprocessSettings(image_size=cfg.image_size, selection=cfg.selection, num_slices=cfg.num_slices,
                                  stride=cfg.stride)
    summary = run_prepare(cfg.data_dir, cfg.out, settings, executor="local" if cfg.no_ray else "ray",
                          address=cfg.address, workers=cfg.workers, keep_non_chest=cfg.keep_non_chest,
                          legacy_layout=cfg.legacy_layout)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"{summary['failed']} volume(s) failed: see {summary['failures']}", file=sys.stderr)
    return 0


def _device(cfg) -> str | None:
    return f"cuda:{cfg.gpu_device}" if cfg.gpu_device is not None else None


def cmd_predict(cfg) -> int:
    from ctplatform.evaluation.predict_files import format_table, predict_files

    if not cfg.checkpoint:
        raise ValueError("predict needs --checkpoint (a bundle folder or a checkpoint)")
    table = predict_files(cfg.checkpoint, cfg.predict_input, cfg.predict_type, cfg.output, device=_device(cfg),
                          metadata_csv=cfg.predict_metadata)
    print(format_table(table))
    if cfg.output:
        print(f"predictions written to {cfg.output} (and .json)")
    return 0


def write_run_config(run_dir: Path, train: TrainConfig, mode: str) -> Path:
    """The run's resolved settings, which `ctplatform run --config <run>/config.yaml` reproduces."""
    from ctplatform.atomic import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    values = {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainConfig)}
    path = run_dir / RUN_CONFIG_FILE
    write_text_atomic(path, to_yaml(RunCommand(mode=mode, **values)))
    return path


def cmd_train_evaluate(cfg, mode: str) -> int:
    from ctplatform import storage
    from ctplatform.train.ray_launcher import local_run_dir, resolved, upload_run_files

    train = resolved(project(cfg, TrainConfig).validate())
    run_dir = Path(local_run_dir(train))  # node-local when --storage-path is a URI; uploaded there at the end
    remote = storage.is_uri(train.storage_path)
    checkpoint = getattr(cfg, "checkpoint", None)
    if mode in ("train", "both"):
        from ctplatform.train.ray_launcher import run_training

        config_file = run_dir / RUN_CONFIG_FILE
        outcome = run_training(train, on_start=lambda checked: write_run_config(run_dir, checked, mode))
        checkpoint = outcome.best_checkpoint
        print(f"run {outcome.run_name}: best checkpoint {checkpoint}")
        print(f"TensorBoard logs: {run_dir / 'logs'}   checkpoints: {run_dir / 'checkpoints'}   "
              f"settings: {config_file}")
    if mode in ("evaluate", "both"):
        from ctplatform.evaluation.evaluate import evaluate

        if checkpoint is None:
            candidate = run_dir / "best_reported" / "checkpoint.ckpt"
            kept = storage.join(train.storage_path, train.run_name, "best_reported", "checkpoint.ckpt")
            if remote and not candidate.is_file() and storage.is_file(kept):  # trained on another machine
                storage.download(kept, candidate)
            if not candidate.is_file():
                raise ValueError("--mode evaluate needs --checkpoint (no finished run with these settings found)")
            checkpoint = str(candidate)
        report_dir = Path(cfg.report_dir) if getattr(cfg, "report_dir", None) else run_dir / "report"
        bundle_dir = run_dir / "bundle" if not Path(checkpoint).is_dir() else None
        metrics = evaluate(checkpoint, train.slice_dir, report_dir, bundle_dir=bundle_dir, device=_device(train),
                           subgroup_metadata=cfg.subgroup_metadata, bootstrap_resamples=cfg.bootstrap_resamples,
                           bootstrap_seed=cfg.bootstrap_seed, min_group_patients=cfg.min_group_patients)
        print(summary_line(metrics))
        if not remote:
            print(f"report: {report_dir / 'report.html'}")
            if bundle_dir is not None:
                print(f"model bundle: {bundle_dir}")
    if remote:
        target = upload_run_files(train)
        print(f"run files (settings, logs, best checkpoint, report, bundle) uploaded to {target}")
    return 0


def summary_line(metrics: dict) -> str:
    """The run summary: each headline metric with its 95% patient-bootstrap interval when the report has one."""
    from ctplatform.evaluation.bootstrap import format_interval

    ci = metrics.get("confidence_intervals")
    if ci is None:
        return (f"validation macro AUROC {metrics['macro']['auroc']:.4f}  macro F1 {metrics['macro']['f1']:.4f}  "
                f"CRG {metrics['crg']['crg']:.4f}  (volume level, calibrated)")
    return (f"validation macro AUROC {format_interval(ci['macro']['auroc'])}  macro F1 "
            f"{format_interval(ci['macro']['f1'])}  CRG {format_interval(ci['crg'])}  (volume level, calibrated; "
            f"[95% CI]: {ci['resamples']} patient-bootstrap resamples of {ci['patients']} patients, seed "
            f"{ci['seed']})")


def cmd_run(cfg) -> int:
    return cmd_predict(cfg) if cfg.mode == "predict" else cmd_train_evaluate(cfg, cfg.mode)


def cmd_score(cfg) -> int:
    from ctplatform.evaluation.evaluate import score_files

    metrics = score_files(cfg.labels, cfg.predictions, out_dir=cfg.out, bootstrap_resamples=cfg.bootstrap_resamples,
                          bootstrap_seed=cfg.bootstrap_seed)
    shown = {"macro": metrics["macro"], "crg": metrics["crg"]["crg"], "n_exams": metrics["n_exams"]}
    if "confidence_intervals" in metrics:
        ci = metrics["confidence_intervals"]
        shown["patient_bootstrap_95ci"] = {
            "macro_auroc": [ci["macro"]["auroc"]["low"], ci["macro"]["auroc"]["high"]],
            "macro_f1": [ci["macro"]["f1"]["low"], ci["macro"]["f1"]["high"]],
            "crg": [ci["crg"]["low"], ci["crg"]["high"]], "resamples": ci["resamples"], "seed": ci["seed"]}
    print(json.dumps(shown, indent=2))
    return 0


def cmd_bundle(cfg) -> int:
    from ctplatform.config.options import check_choices
    from ctplatform.model.bundle_check import check_bundle

    check_choices(cfg)
    print(check_bundle(cfg.bundle).line())
    return 0


def cmd_compare(cfg) -> int:
    from ctplatform.atomic import write_json_atomic
    from ctplatform.evaluation.compare import compare_runs, format_comparison
    from ctplatform.evaluation.run_files import aligned_labels, load_run

    run_a, run_b = load_run(cfg.run_a), load_run(cfg.run_b)
    labels = aligned_labels(cfg.labels, run_a.names, run_a.class_names) if cfg.labels else None
    result = compare_runs(run_a, run_b, labels, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                          alpha=cfg.alpha)
    print(format_comparison(result))
    if cfg.out:
        write_json_atomic(cfg.out, result)
        print(f"comparison written to {cfg.out}")
    return 0


def cmd_tune(cfg) -> int:
    from ctplatform.tune.space import load_space
    from ctplatform.tune.sweep import run_sweep

    base = project(cfg, TrainConfig).validate()
    sweep = project(cfg, TuneConfig)
    space = load_space(sweep.space)
    if sweep.metric:
        space = type(space)(metric=sweep.metric, mode=sweep.metric_mode or space.mode, params=space.params)
    summary = run_sweep(base, space, sweep, resume=sweep.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "best_config"}, indent=2, default=str))
    if summary.get("best_bundle"):
        bundle = summary["best_bundle"]
        print(f"best model bundle: {bundle}  (serve it: ctplatform serve --bundle {bundle})")
    return 0


def cmd_demo(cfg) -> int:
    from ctplatform.demo import run_demo

    run_demo(cfg.workdir, volumes=cfg.volumes, preset=cfg.preset, trials=cfg.trials, epochs=cfg.epochs,
             serve=not cfg.no_serve, verbose=cfg.verbose)
    return 0


COMMANDS = {
    "demo-data": (cmd_demo_data, "write a synthetic CT-RATE-shaped data set (offline)"),
    "demo": (cmd_demo, "the main job end to end on synthetic data (what `make demo` runs)"),
    "prepare": (cmd_prepare, "volumes -> resumable slice cache (parallel on Ray)"),
    "run": (cmd_run, "the original run_task2.py entry point: --mode train|evaluate|both|predict"),
    "train": (lambda cfg: cmd_train_evaluate(cfg, "train"), "train through Ray Train"),
    "evaluate": (lambda cfg: cmd_train_evaluate(cfg, "evaluate"), "score a checkpoint or bundle on the validation "
                                                                  "split"),
    "predict": (cmd_predict, "predict files with a bundle or checkpoint"),
    "tune": (cmd_tune, "hyper-parameter sweep: Optuna + ASHA over Ray Train trials"),
    "score": (cmd_score, "score predictions (CSV or results.json) against a labels CSV"),
    "compare": (cmd_compare, "test two evaluated runs against each other: AUROC (DeLong), macro F1 and CRG "
                             "(paired patient bootstrap)"),
    "bundle": (cmd_bundle, "check a model bundle (schema, calibration, weights against the architecture) without "
                           "deploying it"),
    "serve": (serve_cli.cmd_serve, "serve a model bundle over HTTP (Ray Serve; OpenAPI docs at /docs)"),
}
DESCRIPTIONS = {"serve": serve_cli.DESCRIPTION}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctplatform", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, text) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=DESCRIPTIONS.get(name, text))
        add_config_arguments(command, COMMAND_CONFIGS[name])
        command.set_defaults(func=func)
    return parser


def parse_settings(argv: list[str]):
    """The resolved settings a command line stands for (what the command would run with)."""
    return resolve(build_parser().parse_args(argv), every_setting_name())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ctplatform.model.backbones import WeightsUnavailableError
    from ctplatform.model.bundle import BundleError

    try:
        cfg = resolve(args, every_setting_name())
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from ctplatform.staging import staged

        # Every URI is checked (bucket, credentials) before the command starts Ray; small inputs and outputs given
        # as URIs are staged through local temp copies.
        with staged(cfg) as local_cfg:
            return int(args.func(local_cfg) or 0)
    except DataFormatError as exc:
        print(f"ctplatform {args.command}: error: {cli_prefix(exc)}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, BundleError, WeightsUnavailableError) as exc:
        print(f"ctplatform {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
