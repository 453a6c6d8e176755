"""`ctplatform` command line: data, training, evaluation, prediction, tuning and serving.

Heavy imports (torch, Ray, Lightning) happen inside each command, so `ctplatform --help` is instant and a data
command never starts Ray unless it runs on Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctplatform.data.errors import DataFormatError
from ctplatform.serve.cli import add_serve_parser


def _add_prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=224, help="slice side after resizing (default 224)")
    parser.add_argument("--selection", choices=("even", "stride"), default="even",
                        help="even: --num-slices evenly spaced within the body; stride: every --stride-th slice")
    parser.add_argument("--num-slices", type=int, default=32, help="K for --selection even (default 32)")
    parser.add_argument("--stride", type=int, default=4, help="k for --selection stride (default 4)")


def _prepare_settings(args: argparse.Namespace):
    from ctplatform.data.preprocess import PreprocessSettings

    return PreprocessSettings(image_size=args.image_size, selection=args.selection, num_slices=args.num_slices,
                              stride=args.stride)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ctplatform.data.synthetic import generate_dataset, parse_size

    summary = generate_dataset(args.out, num_volumes=args.volumes, size=parse_size(args.size), seed=args.seed,
                               workers=args.workers)
    print(f"synthetic CT-RATE data set: {summary}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ctplatform.data.prepare import run_prepare

    summary = run_prepare(
        args.data_dir,
        args.out,
        _prepare_settings(args),
        executor="local" if args.no_ray else "ray",
        address=args.address,
        workers=args.workers,
        keep_non_chest=args.keep_non_chest,
        legacy_layout=args.legacy_layout,
    )
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"{summary['failed']} volume(s) failed: see {summary['failures']}", file=sys.stderr)
    return 0


def _bool_choice(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    parser.add_argument(flag, action="store_true", default=None, help=help_text)


def add_run_args(parser: argparse.ArgumentParser, *, mode_default: str | None = "both") -> None:
    """Every flag of the original run_task2.py guide (DESIGN.md §5), with its name and meaning, plus Ray's."""
    from ctplatform import config as c

    defaults = c.TrainConfig()
    if mode_default is not None:
        parser.add_argument("--mode", choices=c.MODES, default=mode_default, help="default: both")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="CT-RATE folder (for prepare)")
    parser.add_argument("--slice-dir", default=defaults.slice_dir, help="prepared slice cache (default ./ct_rate_2d)")
    parser.add_argument("--model", "--model-name", dest="model", choices=c.MODELS, default=defaults.model)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--epochs", "--max-epochs", dest="epochs", type=int, default=defaults.epochs)
    parser.add_argument("--gpu-device", type=int, default=None, help="pin a single-GPU local run to GPU N")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    parser.add_argument("--progressive-unfreeze", action="store_true",
                        help="start frozen, unfreeze the backbone at --unfreeze-epoch")
    parser.add_argument("--unfreeze-epoch", type=int, default=defaults.unfreeze_epoch)
    parser.add_argument("--use-attention", choices=c.ATTENTIONS, default=defaults.use_attention)
    parser.add_argument("--loss-type", choices=c.LOSSES, default=defaults.loss_type)
    parser.add_argument("--use-advanced-aug", action="store_true", help="CutMix and MixUp")
    parser.add_argument("--cutmix-prob", type=float, default=defaults.cutmix_prob)
    parser.add_argument("--use-multiscale", action="store_true", help="fuse the last three backbone stages")
    parser.add_argument("--use-mixed-precision", action="store_true", help="bf16 where supported, else fp16")
    parser.add_argument("--early-stopping-patience", type=int, default=defaults.early_stopping_patience)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="DataLoader workers")
    parser.add_argument("--checkpoint", default=None, help="bundle folder or Lightning checkpoint")
    parser.add_argument("--predict-input", nargs="+", default=[], metavar="FILE")
    parser.add_argument("--predict-type", choices=c.PREDICT_TYPES, default=defaults.predict_type)
    parser.add_argument("--predict-metadata", default=None, metavar="CSV",
                        help="CT-RATE metadata CSV giving each volume's rescale (default: the header's, else x - 1024)")
    # beyond the guide
    parser.add_argument("--weights", default=defaults.weights, help="imagenet | none | PATH (default none)")
    parser.add_argument("--input-windows", choices=c.INPUT_WINDOWS, default=defaults.input_windows)
    parser.add_argument("--head", choices=c.HEADS, default=defaults.head,
                        help="slice: slices trained on volume labels, then --aggregation; attention-mil: gated "
                             "attention over a volume's slices, trained on volume labels")
    parser.add_argument("--mil-pooling", choices=c.MIL_POOLINGS, default=defaults.mil_pooling,
                        help="attention-mil: one attention distribution per class or one shared (default per-class)")
    parser.add_argument("--mil-hidden", type=int, default=defaults.mil_hidden,
                        help="attention-mil: width of the gated attention (default 128)")
    parser.add_argument("--mil-slices", type=int, default=None,
                        help="attention-mil: K slices per volume in training, evenly spread (default: all cached); "
                             "a batch holds max(1, --batch-size // K) volumes")
    parser.add_argument("--mil-grad-checkpoint", action="store_true",
                        help="attention-mil: gradient checkpointing of the slice encoder (less memory, more compute)")
    parser.add_argument("--mil-chunk-slices", type=int, default=None,
                        help="attention-mil: at most this many slices per encoder call")
    parser.add_argument("--mil-frozen-encoder", action="store_true",
                        help="attention-mil: keep the slice encoder fixed and train the pooling on cached slice "
                             "features (fast sweeps; use with --weights imagenet or PATH)")
    parser.add_argument("--mil-feature-dir", default=None,
                        help="attention-mil: cached feature folder (default <slice-dir>/mil_features)")
    parser.add_argument("--aggregation", choices=c.AGGREGATIONS, default=defaults.aggregation,
                        help="slice -> volume probability (default mean)")
    parser.add_argument("--topk", type=int, default=defaults.topk)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--limit-train-batches", type=float, default=defaults.limit_train_batches,
                        help="fraction (or count, if > 1) of training batches per epoch")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    parser.add_argument("--ray-workers", type=int, default=defaults.ray_workers,
                        help="Ray Train workers (DDP processes; the guide's --num-workers stays DataLoader workers)")
    parser.add_argument("--gpus-per-worker", type=float, default=defaults.gpus_per_worker)
    parser.add_argument("--cpus-per-worker", type=float, default=defaults.cpus_per_worker)
    parser.add_argument("--cpu", dest="use_gpu", action="store_false", default=None,
                        help="train on CPUs even where GPUs exist")
    parser.add_argument("--storage-path", default=defaults.storage_path, help="runs folder or URI (default ./runs)")
    parser.add_argument("--run-name", default=None, help="default: derived from the training settings (stable)")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures)
    parser.add_argument("--report-dir", default=None, help="evaluation report folder (default <run>/report)")
    parser.add_argument("--output", default=None, help="predictions file (CSV; a JSON beside it)")


def config_from_args(args: argparse.Namespace, mode: str):
    from ctplatform.config import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["mode"] = mode
    if values.get("limit_train_batches") is not None and values["limit_train_batches"] > 1:
        values["limit_train_batches"] = int(values["limit_train_batches"])
    return TrainConfig(**values).validate()


def cmd_run(args: argparse.Namespace) -> int:
    mode = getattr(args, "mode", None) or args.fixed_mode
    cfg = config_from_args(args, mode)
    if mode == "predict":
        from ctplatform.predict import format_table, predict_files

        if not cfg.checkpoint:
            raise ValueError("--mode predict needs --checkpoint (a bundle folder or a checkpoint)")
        table = predict_files(cfg.checkpoint, cfg.predict_input, cfg.predict_type, cfg.output,
                              device=f"cuda:{cfg.gpu_device}" if cfg.gpu_device is not None else None,
                              metadata_csv=cfg.predict_metadata)
        print(format_table(table))
        if cfg.output:
            print(f"predictions written to {cfg.output} (and .json)")
        return 0
    from ctplatform.train.ray_launcher import local_run_dir, resolved

    cfg = resolved(cfg)
    run_dir = Path(local_run_dir(cfg))
    checkpoint = cfg.checkpoint
    if mode in ("train", "both"):
        from ctplatform.train.ray_launcher import run_training

        outcome = run_training(cfg)
        checkpoint = outcome.best_checkpoint
        print(f"run {outcome.run_name}: best checkpoint {checkpoint}")
        print(f"TensorBoard logs: {run_dir / 'logs'}   checkpoints: {run_dir / 'checkpoints'}")
    if mode in ("evaluate", "both"):
        from ctplatform.evaluation.evaluate import evaluate

        if checkpoint is None:
            candidate = run_dir / "best_reported" / "checkpoint.ckpt"
            if not candidate.is_file():
                raise ValueError("--mode evaluate needs --checkpoint (no finished run with these settings found)")
            checkpoint = str(candidate)
        report_dir = Path(cfg.report_dir) if cfg.report_dir else run_dir / "report"
        bundle_dir = run_dir / "bundle" if not Path(checkpoint).is_dir() else None
        metrics = evaluate(checkpoint, cfg.slice_dir, report_dir, bundle_dir=bundle_dir,
                           device=f"cuda:{cfg.gpu_device}" if cfg.gpu_device is not None else None)
        print(f"validation macro AUROC {metrics['macro']['auroc']:.4f}  macro F1 {metrics['macro']['f1']:.4f}  "
              f"CRG {metrics['crg']['crg']:.4f}  (volume level, calibrated)")
        print(f"report: {report_dir / 'report.html'}")
        if bundle_dir is not None:
            print(f"model bundle: {bundle_dir}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ctplatform.evaluation.evaluate import score_files

    metrics = score_files(args.labels, args.predictions, out_dir=args.out)
    macro = metrics["macro"]
    print(json.dumps({"macro": macro, "crg": metrics["crg"]["crg"], "n_exams": metrics["n_exams"]}, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ctplatform.tune.space import load_space
    from ctplatform.tune.sweep import SweepSettings, run_sweep

    base = config_from_args(args, "train")
    space = load_space(args.space)
    if args.metric:
        space = type(space)(metric=args.metric, mode=args.metric_mode or space.mode, params=space.params)
    settings = SweepSettings(name=args.name, storage_path=args.storage_path, num_samples=args.num_samples,
                             max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial,
                             gpus_per_trial=args.gpus_per_trial, cpus_per_worker=args.cpus_per_worker, seed=args.seed,
                             searcher=args.searcher, scheduler=args.scheduler, grace_period=args.grace_period,
                             max_failures=args.max_failures, address=args.address)
    summary = run_sweep(base, space, settings, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "best_config"}, indent=2, default=str))
    if summary.get("best_bundle"):
        bundle = summary["best_bundle"]
        print(f"best model bundle: {bundle}  (serve it: ctplatform serve --bundle {bundle})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ctplatform.demo import run_demo

    run_demo(args.workdir, volumes=args.volumes, trials=args.trials, epochs=args.epochs, serve=not args.no_serve)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctplatform", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_data = sub.add_parser("demo-data", help="write a synthetic CT-RATE-shaped data set (offline)")
    demo_data.add_argument("--out", required=True, help="output folder")
    demo_data.add_argument("--volumes", type=int, default=120, help="number of volumes (default 120)")
    demo_data.add_argument("--size", default="64x64x48", help="ROWSxCOLSxSLICES (default 64x64x48; real: 512x512x300)")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument("--workers", type=int, default=1,
                           help="processes drawing scans in parallel (default 1); the files are the same for any value")
    demo_data.set_defaults(func=cmd_demo_data)

    demo = sub.add_parser("demo", help="the main job end to end on synthetic data (what `make demo` runs)")
    demo.add_argument("--workdir", default="demo_run")
    demo.add_argument("--volumes", type=int, default=96)
    demo.add_argument("--trials", type=int, default=4)
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--no-serve", action="store_true", help="stop after exporting the best bundle")
    demo.set_defaults(func=cmd_demo)

    prepare = sub.add_parser("prepare", help="volumes -> resumable slice cache (parallel on Ray)")
    prepare.add_argument("--data-dir", default="./ct_rate_data", help="CT-RATE folder (default ./ct_rate_data)")
    prepare.add_argument("--out", default="./ct_rate_2d", help="cache folder, the guide's --slice-dir")
    _add_prepare_args(prepare)
    prepare.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    prepare.add_argument("--workers", type=int, default=None, help="local Ray CPUs (default: all cores)")
    prepare.add_argument("--no-ray", action="store_true", help="prepare in this process, one volume at a time")
    prepare.add_argument("--keep-non-chest", action="store_true", help="keep volumes with no lung field (head CTs)")
    prepare.add_argument("--legacy-layout", action="store_true",
                         help="also write the original guide's slices/{split}/*.npy and splits/{split}_slices.csv")
    prepare.set_defaults(func=cmd_prepare)

    run = sub.add_parser("run", help="the original guide's entry point: --mode train|evaluate|both|predict")
    add_run_args(run)
    run.set_defaults(func=cmd_run, fixed_mode=None)
    for mode, text in (("train", "train through Ray Train"), ("evaluate", "score a checkpoint or bundle"),
                       ("predict", "predict files with a bundle or checkpoint")):
        command = sub.add_parser(mode, help=text)
        add_run_args(command, mode_default=None)
        command.set_defaults(func=cmd_run, fixed_mode=mode)

    tune = sub.add_parser("tune", help="hyper-parameter sweep: Optuna + ASHA over Ray Train trials")
    add_run_args(tune, mode_default=None)
    tune.add_argument("--space", default=None, help="search space YAML (default: the packaged default_space.yaml)")
    tune.add_argument("--name", default="sweep", help="sweep name: <storage-path>/<name> (default sweep)")
    tune.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    tune.add_argument("--max-concurrent", type=int, default=1, help="trials at once (default 1)")
    tune.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    tune.add_argument("--gpus-per-trial", type=float, default=1.0, help="GPUs per trial worker (fractions allowed)")
    tune.add_argument("--metric", default=None, help="metric to optimise (default: the space file's)")
    tune.add_argument("--metric-mode", choices=("min", "max"), default=None)
    tune.add_argument("--searcher", choices=("optuna", "random"), default="optuna")
    tune.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    tune.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this --name")
    tune.set_defaults(func=cmd_tune)

    score = sub.add_parser("score", help="score predictions (CSV or results.json) against a labels CSV")
    score.add_argument("--labels", required=True, help="ground-truth labels CSV")
    score.add_argument("--predictions", required=True, help="predictions CSV or the challenge's results.json")
    score.add_argument("--out", default=None, help="folder for metrics.json")
    score.set_defaults(func=cmd_score)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ctplatform.model.backbones import WeightsUnavailableError
    from ctplatform.model.bundle import BundleError

    try:
        return int(args.func(args) or 0)
    except (DataFormatError, FileNotFoundError, ValueError, BundleError, WeightsUnavailableError) as exc:
        print(f"ctplatform {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
