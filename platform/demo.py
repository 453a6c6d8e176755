"""`ctplatform demo` (what `make demo` runs): the whole product on an embedded local Ray, in minutes on a CPU.

synthetic CT-RATE data -> prepare (Ray tasks) -> a small Optuna + ASHA sweep (Ray Tune over Ray Train trials)
-> the best epoch exported as a bundle -> served over HTTP by Ray Serve and asked once with a volume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(workdir: str | Path, *, volumes: int = 96, size: str = "64x64x48", trials: int = 4, epochs: int = 2,
             serve: bool = True, verbose: bool = False) -> dict:
    """`verbose=False` keeps Ray's worker logs and Tune's status tables off the terminal (errors still come back
    as each failed trial's line and the sweep summary); `verbose=True` shows everything."""
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

    def step(text: str) -> None:
        print(f"\n[{time.perf_counter() - begin:6.0f} s] {text}", flush=True)

    started = connect(quiet=not verbose)  # one embedded Ray for every step (dashboard on 127.0.0.1)
    try:
        data = work / "ct_rate_data"
        if not (data / "dataset").is_dir():
            step(f"1/4 synthetic CT-RATE data: {volumes} volumes of {size} -> {data}")
            generate_dataset(data, num_volumes=volumes, size=parse_size(size), seed=0)
        else:
            step(f"1/4 synthetic data already at {data}")
        cache = work / "ct_rate_2d"
        step(f"2/4 prepare the slice cache -> {cache}")
        prepared = run_prepare(data, cache, PreprocessSettings(image_size=64, num_slices=8), executor="ray")
        print(f"  {prepared['cached']} volumes cached ({prepared['prepared_now']} now, {prepared['failed']} failed) in "
              f"{prepared['seconds']:.0f} s", flush=True)
        step(f"3/4 sweep: {trials} trials x {epochs} epochs (Optuna TPE + ASHA, each trial a Ray Train run)")
        base = TrainConfig(slice_dir=str(cache), model="resnet50", batch_size=32, epochs=epochs, num_workers=0,
                           cpus_per_worker=1, use_gpu=None, storage_path=str(work / "runs"))
        settings = TuneConfig(name="demo", storage_path=str(work / "runs"), num_samples=trials, seed=0,
                                 gpus_per_trial=1.0)
        resume = (work / "runs" / "demo" / "tuner.pkl").is_file()
        summary = run_sweep(base, load_space("demo_space.yaml"), settings, resume=resume,
                            tune_verbosity=1 if verbose else 0)
        bundle = summary["best_bundle"]
        step(f"best bundle: {bundle} (validation macro AUROC {summary['best_validation_macro_auroc']:.3f}); "
             f"report: {summary['best_report']}")
        answer = None
        if serve:
            from ctplatform.serve.demo_request import serve_and_ask_once

            step("4/4 serve the best bundle with Ray Serve and ask once")
            volume = sorted((data / "dataset").glob("valid*/*/*/*.nii.gz"))[0]
            answer = serve_and_ask_once(bundle, volume)
            print(json.dumps(answer, indent=2)[:3000])
        step("done. Results:")
        print(f"  slice cache      {cache}\n  sweep            {summary['sweep_dir']}\n"
              f"  trials table     {summary.get('summary_dir')}/trials.csv\n  best bundle      {bundle}\n"
              f"  best report      {summary['best_report']}")
        return {"sweep": summary, "answer": answer}
    finally:
        shutdown_if(started)
