"""`ctplatform` command line: data, training, evaluation, prediction, tuning and serving.

Heavy imports (torch, Ray, Lightning) happen inside each command, so `ctplatform --help` is instant and a data
command never starts Ray unless it runs on Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from ctplatform.data.errors import DataFormatError


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

    summary = generate_dataset(args.out, num_volumes=args.volumes, size=parse_size(args.size), seed=args.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctplatform", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_data = sub.add_parser("demo-data", help="write a synthetic CT-RATE-shaped data set (offline)")
    demo_data.add_argument("--out", required=True, help="output folder")
    demo_data.add_argument("--volumes", type=int, default=120, help="number of volumes (default 120)")
    demo_data.add_argument("--size", default="64x64x48", help="ROWSxCOLSxSLICES (default 64x64x48; real: 512x512x300)")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=cmd_demo_data)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"ctplatform {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
