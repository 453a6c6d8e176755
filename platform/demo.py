"""`ctplatform demo` (what `make demo` runs): the whole product on an embedded local Ray, in minutes on a CPU.

synthetic CT-RATE data -> prepare (Ray tasks) -> a small Optuna + ASHA sweep (Ray Tune over Ray Train trials)
-> the best epoch exported as a bundle -> served over HTTP by Ray Serve and asked once with a volume -> a summary
of where everything is.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from ctplatform.config.prepare import DemoConfig

# The easy preset's findings run through every slice, so one slice of a volume carries its labels; what teaches a
# network from random weights is many volumes (measured, resnet50 from random weights: 96 volumes x 8 slices stay
# near macro AUROC 0.65; many more volumes with fewer slices each, in the same time, learn). 16 slices a volume are
# plenty to draw them from.
DEMO_SLICES = 1
# timm's ResNet-10-T: from random weights it learns the easy preset in a few CPU minutes (validation macro AUROC
# 0.88 after 6 epochs; resnet50 reached 0.76 in the same budget: BENCHMARKS.md, "The demo's easy preset").
DEMO_MODEL = "resnet10t"
# The synthetic volumes' size (x, y, slices): small enough for the CPU budget, with room for the findings.
DEMO_SIZE = "64x64x16"
_CLI = DemoConfig()  # `ctplatform demo`'s defaults are this function's: one place for both


def run_demo(workdir: str | Path, *, volumes: int = _CLI.volumes, size: str = DEMO_SIZE, preset: str = _CLI.preset,
             trials: int = _CLI.trials, epochs: int = _CLI.epochs, serve: bool = not _CLI.no_serve,
             verbose: bool = _CLI.verbose) -> dict:
    """`verbose=False` keeps Ray's worker logs and Tune's status tables off the terminal (errors still come back
    as each failed trial's line and the sweep summary); `verbose=True` shows everything. Progress bars show only
    on a terminal."""
    from ctplatform.config import TrainConfig
    from ctplatform.config.tune import TuneConfig
    from ctplatform.data.prepare import run_prepare
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.data.synthetic import generate_dataset, parse_size
    from ctplatform.ray_session import connect, shutdown_if
    from ctplatform.tune.space import load_space
    from ctplatform.tune.sweep import run_sweep

    work = Path(workdir).resolve()
    begin = time.perf_counter()
    bars = sys.stderr.isatty()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - begin:4.0f} s] {text}", flush=True)

    started = connect(quiet=not verbose)  # one embedded Ray for every step (dashboard on 127.0.0.1)
    try:
        data = work / "ct_rate_data"
        if not (data / "dataset").is_dir():
            step(f"1/4 synthetic CT-RATE data ({preset} preset): {volumes} volumes of {size} -> {data}")
            generate_dataset(data, num_volumes=volumes, size=parse_size(size), seed=0, preset=preset, workers=2,
                             progress=bars)
        else:
            step(f"1/4 synthetic data already at {data}")
        cache = work / "ct_rate_2d"
        step(f"2/4 prepare the slice cache -> {cache}")
        prepared = run_prepare(data, cache, PreprocessSettings(image_size=64, num_slices=DEMO_SLICES), executor="ray",
                               progress=bars)
        print(f"  {prepared['cached']} volumes cached ({prepared['prepared_now']} now, {prepared['failed']} failed) in "
              f"{prepared['seconds']:.0f} s", flush=True)
        step(f"3/4 sweep: {trials} trials x {epochs} epochs (Optuna TPE + ASHA, each trial a Ray Train run)")
        base = TrainConfig(slice_dir=str(cache), model=DEMO_MODEL, loss_type="bce", batch_size=32, epochs=epochs,
                           num_workers=0, use_gpu=None, storage_path=str(work / "runs"))
        # one trial at a time: two at once (0.9 CPU each) start more Python processes together than Ray expects on
        # two cores, and it warns; ASHA may stop a later trial that is behind after its first epoch
        settings = TuneConfig(name="demo", storage_path=str(work / "runs"), num_samples=trials, seed=0,
                              gpus_per_trial=1.0)
        resume = (work / "runs" / "demo" / "tuner.pkl").is_file()
        summary = run_sweep(base, load_space("demo_space.yaml"), settings, resume=resume,
                            tune_verbosity=1 if verbose else 0)
        answer = None
        if serve:
            from ctplatform.serve.demo_request import serve_and_ask_once

            step("4/4 serve the best bundle with Ray Serve and ask once over HTTP")
            volume, labels = example_volume(data)
            # Ray started here stops Serve with it (see stop_serve)
            answer = serve_and_ask_once(summary["best_bundle"], volume, quiet=not verbose, stop_serve=not started)
            answer["volume"], answer["labels"] = volume.name, labels
        step("done")
        lines = summary_lines(summary, answer, tensorboard_dir=Path(summary["sweep_dir"]) / "trials")
        print("\n".join(lines), flush=True)
        return {"sweep": summary, "answer": answer, "summary_lines": lines}
    finally:
        shutdown_if(started)


def example_volume(data_dir: Path) -> tuple[Path, list[str]]:
    """The validation volume the demo sends and its labels: the first (by name) whose label row lists a finding, so
    the served answer can be read against something; the first of all when none has one."""
    labels = validation_labels(data_dir)
    volumes = sorted((data_dir / "dataset").glob("valid*/*/*/*.nii.gz"))
    volume = next((v for v in volumes if labels.get(v.name)), volumes[0])
    return volume, labels.get(volume.name, [])


def validation_labels(data_dir: Path) -> dict[str, list[str]]:
    """Each validation volume's findings as its label row lists them (the synthetic data set's ground truth)."""
    import pandas as pd

    from ctplatform.labels import CLASS_NAMES

    table = pd.read_csv(data_dir / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    return {row["VolumeName"]: [name for name in CLASS_NAMES if int(row[name]) == 1]
            for row in table.to_dict("records")}


def summary_lines(summary: dict, answer: dict | None, *, tensorboard_dir: Path, top: int = 3) -> list[str]:
    """What the demo made and where it is, a few lines; every path printed exists."""
    from ctplatform.tune.layout import STUDY_FILE

    config = ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in sorted(summary.get("best_config", {}).items()))
    bundle = summary["best_bundle"]
    lines = [
        f"  best trial     {_trial_id(summary.get('best_trial'))} ({config})",
        f"                 validation macro AUROC {summary['best_validation_macro_auroc']:.3f} "
        f"(best epoch {summary.get('best_epoch')})",
        f"  report         {summary['best_report']}",
        f"  TensorBoard    tensorboard --logdir {tensorboard_dir}",
        f"  Optuna study   optuna-dashboard sqlite:///{Path(summary['workspace']) / STUDY_FILE}",
        f"  trials table   {Path(summary['workspace']) / 'trials.csv'}",
        f"  bundle         {bundle}",
    ]
    if answer is not None:
        probabilities = answer["response"]["probabilities"]
        best = sorted(probabilities, key=lambda name: -probabilities[name])[:top]
        lines += [
            f"  served answer  {answer['volume']} (HTTP {answer['status']}, {answer['round_trip_ms']:.0f} ms): "
            + ", ".join(f"{name} {probabilities[name]:.2f}" for name in best),
            f"                 its labels: {', '.join(answer['labels']) or 'none'}",
        ]
    lines.append(f"  serve it       ctplatform serve --bundle {bundle}   (upload page: http://127.0.0.1:8000/)")
    return lines


def _trial_id(folder: str | None) -> str | None:
    """Tune's trial folder name (run_trial_<id>_<n>_<settings>_<time>) -> the trial id the sweep's lines show."""
    found = re.match(r"run_trial_([0-9a-f]+)_", folder or "")
    return found.group(1) if found else folder
