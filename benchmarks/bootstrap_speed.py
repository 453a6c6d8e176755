"""Patient-bootstrap confidence intervals: the vectorised resampler against a loop over scikit-learn, same process.

    python benchmarks/bootstrap_speed.py [--volumes 3039] [--patients 1304] [--resamples 1000] [--json PATH]

CT-RATE's validation split has 3,039 volumes of 1,304 patients and 18 classes (prevalence as published). Each
resample draws patients with replacement and scores macro AUROC, every class's AUROC, macro F1 and CRG. The
baseline is what one writes by hand: per resample, the drawn patients' rows gathered and scored with scikit-learn
(``roc_auc_score`` and ``f1_score`` per class, CRG from the counts); it is timed on a few resamples and extrapolated.
One core: BLAS and OpenMP are limited to one thread before numpy is imported. The issue's goal: 1,000 resamples in
under 10 s.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, print_table, save  # noqa: E402

from ctplatform.evaluation.bootstrap import (  # noqa: E402
    bootstrap_distributions,
    confidence_intervals,
    patient_resample_weights,
)
from ctplatform.evaluation.compare import auroc_comparison  # noqa: E402
from ctplatform.evaluation.metrics import crg_score, score_predictions  # noqa: E402
from ctplatform.labels import CLASS_NAMES, VALID_PREVALENCE  # noqa: E402


def validation_like(volumes: int, patients: int, seed: int = 0):
    """Labels with CT-RATE's validation prevalence, shared by a patient's volumes, and float32 model-like scores."""
    rng = np.random.default_rng(seed)
    owner = np.sort(np.r_[np.arange(patients), rng.integers(0, patients, volumes - patients)])
    prevalence = np.array([VALID_PREVALENCE[name] for name in CLASS_NAMES])
    y = (rng.random((patients, len(CLASS_NAMES))) < prevalence)[owner].astype(int)
    logits = 1.2 * y + rng.normal(size=y.shape) - 1.5
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    return y, probs, np.array([f"valid_{p}" for p in owner])


def naive_loop(y, probs, patients, resamples, seed):
    """One resample at a time: gather the drawn patients' rows, score them with scikit-learn."""
    rng = np.random.default_rng(seed)
    unique, codes = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(codes == p) for p in range(len(unique))]
    decisions = (probs >= 0.5).astype(int)
    for _ in range(resamples):
        rows = np.concatenate([rows_of[p] for p in rng.integers(0, len(unique), len(unique))])
        truth = y[rows]
        for c in range(y.shape[1]):
            if 0 < truth[:, c].sum() < len(rows):
                roc_auc_score(truth[:, c], probs[rows, c])
            f1_score(truth[:, c], decisions[rows, c], zero_division=0)
        crg_score(truth, decisions[rows])


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=3039)
    parser.add_argument("--patients", type=int, default=1304)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--baseline-resamples", type=int, default=20, help="resamples timed for the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to this file")
    parser.add_argument("--out", default=None, help="folder for a JSON copy of the results")
    args = parser.parse_args()
    y, probs, patients = validation_like(args.volumes, args.patients)
    n = args.resamples

    baseline = timed(lambda: naive_loop(y, probs, patients, args.baseline_resamples, 0), 1)
    baseline_full = baseline / args.baseline_resamples * n
    weights_time = timed(lambda: patient_resample_weights(patients, n, 0), args.repeats)
    weights = patient_resample_weights(patients, n, 0)
    vectorised = timed(lambda: bootstrap_distributions(y, probs, weights), args.repeats)
    point = score_predictions(y, probs)
    full = timed(lambda: confidence_intervals(y, probs, patients, CLASS_NAMES, point, n_resamples=n, seed=0),
                 args.repeats)
    other = np.clip(probs + np.random.default_rng(1).normal(0, 0.05, probs.shape), 0, 1)
    delong = timed(lambda: auroc_comparison(y, probs, other, patients, CLASS_NAMES, 0.05), args.repeats)

    shape = f"{len(y)} volumes, {len(np.unique(patients))} patients, {len(CLASS_NAMES)} classes"
    rows = [
        {"path": f"naive loop: sklearn per resample ({args.baseline_resamples} timed, extrapolated)",
         "resamples": n, "seconds": baseline_full, "speed-up": 1.0},
        {"path": "patient resample weights only", "resamples": n, "seconds": weights_time,
         "speed-up": baseline_full / weights_time},
        {"path": "vectorised: every class's AUROC + macro AUROC, F1, CRG", "resamples": n, "seconds": vectorised,
         "speed-up": baseline_full / vectorised},
        {"path": "confidence_intervals() end to end (weights + scores + percentiles)", "resamples": n,
         "seconds": full, "speed-up": baseline_full / full},
        {"path": "compare: DeLong per class + macro, patient-clustered (no resampling)", "resamples": 0,
         "seconds": delong, "speed-up": None},
    ]
    print_table(f"patient bootstrap, {shape}, one core (median of {args.repeats})", rows)
    print(f"goal: {n} resamples in under 10 s on one core: {'met' if full < 10 else 'NOT met'} ({full:.2f} s)")
    save(args.out, "bootstrap_speed", rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "data": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
