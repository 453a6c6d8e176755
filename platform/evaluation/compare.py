"""Comparing two runs on the same cases: which differences are real.

* AUROC (per class and macro): DeLong's paired test (:mod:`ctplatform.evaluation.delong`), cluster-robust by
  patient, on the models' own probabilities. The per-class p-values are Holm-adjusted over the classes tested
  (18 tests at 5% would otherwise call about one difference significant by chance).
* Macro F1 and CRG (the calibrated decisions at p >= 0.5): a paired patient bootstrap, both runs scored on the
  same resamples; the interval is the percentile interval of the difference, the p-value twice the smaller tail.

A difference is called significant when its (adjusted) p-value is below ``alpha``; "not significant" means the data
cannot tell the runs apart at that level, not that they are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

from ctplatform.evaluation.bootstrap import bootstrap_distributions, patient_resample_weights, patients_of
from ctplatform.evaluation.delong import clustered_covariance, delong_paired_test, macro_auroc_influence, paired_test
from ctplatform.evaluation.metrics import score_predictions
from ctplatform.evaluation.run_files import EvaluatedRun, check_comparable
from ctplatform.labels import volume_stem

AUROC_METHOD = "DeLong's paired test, cluster-robust by patient (per-class p Holm-adjusted)"
BOOTSTRAP_METHOD = "paired percentile bootstrap, resampling patients"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out.tolist()


def _with_interval(test: dict[str, Any], alpha: float) -> dict[str, Any]:
    half = norm.ppf(1 - alpha / 2) * test["se"]
    return {**test, "low": test["difference"] - half, "high": test["difference"] + half}


def macro_auroc_test(y_true: np.ndarray, ranking_a: np.ndarray, ranking_b: np.ndarray,
                     patients: Sequence[Any]) -> dict[str, Any]:
    """Macro AUROC A − B (the official mean over classes with both labels), DeLong, cluster-robust by patient."""
    macro_a, influence_a, used = macro_auroc_influence(y_true, ranking_a)
    macro_b, influence_b, _ = macro_auroc_influence(y_true, ranking_b)
    if macro_a is None:
        raise ValueError("no class has both label values: macro AUROC is undefined")
    variance = clustered_covariance(influence_a - influence_b, patients)[0, 0]
    return {"auroc_a": macro_a, "auroc_b": macro_b, "classes": len(used),
            **paired_test(macro_a - macro_b, variance)}


def ties_with_best(predictions: dict[str, dict[str, Any]], best: str, alpha: float = 0.05) -> dict[str, dict]:
    """Which trials' macro AUROC is not significantly below the best trial's.

    ``predictions``: trial -> ``{"volume_names", "patients", "probs" (N, C), "targets" (N, C)}`` (the validation
    volumes each trial's reported epoch was scored on). Each trial is tested against ``best`` on the same cases
    (DeLong, cluster-robust by patient, two-sided): tied when ``p >= alpha`` or when it is not below the best at
    all. Returns trial -> ``{"tied": bool | None, "difference": best − trial, "p", "note"}`` (``tied`` None when
    the trial cannot be tested: other cases or labels).
    """
    reference = predictions[best]
    keys = [volume_stem(name) for name in reference["volume_names"]]
    y_true = np.asarray(reference["targets"]).astype(np.int64)
    out: dict[str, dict] = {best: {"tied": True, "difference": 0.0, "p": None, "note": "best"}}
    for trial, entry in predictions.items():
        if trial == best:
            continue
        row_of = {volume_stem(name): i for i, name in enumerate(entry["volume_names"])}
        if set(row_of) != set(keys):
            out[trial] = {"tied": None, "difference": None, "p": None, "note": "other validation cases"}
            continue
        order = [row_of[k] for k in keys]
        if not np.array_equal(np.asarray(entry["targets"])[order], y_true):
            out[trial] = {"tied": None, "difference": None, "p": None, "note": "other validation labels"}
            continue
        test = macro_auroc_test(y_true, np.asarray(reference["probs"], dtype=np.float64),
                                np.asarray(entry["probs"], dtype=np.float64)[order], reference["patients"])
        out[trial] = {"tied": bool(test["p"] >= alpha or test["difference"] <= 0), "difference": test["difference"],
                      "p": test["p"], "note": ""}
    return out


def auroc_comparison(y_true, ranking_a, ranking_b, patients, class_names, alpha) -> dict[str, Any]:
    macro = _with_interval(macro_auroc_test(y_true, ranking_a, ranking_b, patients), alpha)
    macro["significant"] = bool(macro["p"] < alpha)
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        column = y_true[:, index]
        if column.min() == column.max():
            per_class[name] = {"note": "one label value: AUROC undefined, not tested"}
            continue
        per_class[name] = _with_interval(delong_paired_test(column, ranking_a[:, index], ranking_b[:, index],
                                                            clusters=patients), alpha)
    tested = [name for name, entry in per_class.items() if "p" in entry]
    for name, adjusted in zip(tested, holm([per_class[n]["p"] for n in tested]), strict=True):
        per_class[name].update(p_holm=adjusted, significant=bool(adjusted < alpha))
    return {"method": AUROC_METHOD, "macro": macro, "per_class": per_class}


def _paired_bootstrap(estimate_a, estimate_b, samples_a, samples_b, alpha) -> dict[str, Any]:
    difference = samples_a - samples_b
    finite = difference[np.isfinite(difference)]
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0)))
    return {"a": estimate_a, "b": estimate_b, "difference": estimate_a - estimate_b, "low": float(low),
            "high": float(high), "p": float(p), "valid_resamples": int(finite.size), "significant": bool(p < alpha)}


def compare_runs(a: EvaluatedRun, b: EvaluatedRun, labels: np.ndarray | None = None, *, resamples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """The JSON-ready comparison of run A with run B (differences are A − B)."""
    check_comparable(a, b)
    y_true = labels if labels is not None else (a.labels if a.labels is not None else b.labels)
    if y_true is None:
        raise ValueError(f"no labels to compare {a.source} and {b.source} on: their report folders keep no "
                         "labels.csv; pass --labels CSV")
    class_names = a.class_names
    patients = patients_of(a.names)
    weights = patient_resample_weights(patients, resamples, seed)
    score_a = score_predictions(y_true, a.probs, class_names)
    score_b = score_predictions(y_true, b.probs, class_names)
    dist_a = bootstrap_distributions(y_true, a.probs, weights)
    dist_b = bootstrap_distributions(y_true, b.probs, weights)
    return {
        "run_a": a.source, "run_b": b.source, "cases": len(a.names), "patients": int(np.unique(patients).size),
        "classes": list(class_names), "alpha": alpha, "resamples": resamples, "seed": seed,
        "auroc": auroc_comparison(y_true, a.ranking, b.ranking, patients, class_names, alpha),
        "macro_f1": {"method": BOOTSTRAP_METHOD, **_paired_bootstrap(
            score_a["macro"]["f1"], score_b["macro"]["f1"], dist_a["macro_f1"], dist_b["macro_f1"], alpha)},
        "crg": {"method": BOOTSTRAP_METHOD, **_paired_bootstrap(
            score_a["crg"]["crg"], score_b["crg"]["crg"], dist_a["crg"], dist_b["crg"], alpha)},
    }


def _verdict(significant: bool, difference: float, p: float, alpha: float) -> str:
    if not significant:
        return f"not significant (p = {p:.3g} >= {alpha:g})"
    return f"SIGNIFICANT: A {'higher' if difference > 0 else 'lower'} (p = {p:.3g})"


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as text: a per-class table, the macro lines and one plain verdict per metric."""
    alpha, auroc = result["alpha"], result["auroc"]
    lines = [f"A: {result['run_a']}", f"B: {result['run_b']}",
             f"{result['cases']} cases, {result['patients']} patients, the same labels; differences are A - B.", "",
             f"AUROC: {auroc['method']}",
             f"{'class':34s} {'A':>7s} {'B':>7s} {'A-B':>8s} {'95% CI':>19s} {'p':>8s}  verdict"]
    rows = [("macro", auroc["macro"], auroc["macro"]["p"])]
    rows += [(name, entry, entry.get("p_holm")) for name, entry in auroc["per_class"].items()]
    for name, entry, p in rows:
        if "note" in entry:
            lines.append(f"{name:34s} {entry['note']}")
            continue
        ci = f"[{entry['low']:+.4f}, {entry['high']:+.4f}]"
        lines.append(f"{name:34s} {entry['auroc_a']:7.4f} {entry['auroc_b']:7.4f} {entry['difference']:+8.4f} "
                     f"{ci:>19s} {p:8.3g}  {_verdict(entry['significant'], entry['difference'], p, alpha)}")
    lines.append("")
    for key, label in (("macro_f1", "macro F1"), ("crg", "CRG")):
        entry = result[key]
        lines.append(f"{label} ({entry['method']}, {result['resamples']} resamples, seed {result['seed']}): "
                     f"A {entry['a']:.4f}  B {entry['b']:.4f}  A-B {entry['difference']:+.4f} "
                     f"[{entry['low']:+.4f}, {entry['high']:+.4f}]  "
                     f"{_verdict(entry['significant'], entry['difference'], entry['p'], alpha)}")
    significant = [name for name, entry in auroc["per_class"].items() if entry.get("significant")]
    lines += ["", "In short: macro AUROC difference " + _verdict(auroc["macro"]["significant"],
                                                                 auroc["macro"]["difference"], auroc["macro"]["p"],
                                                                 alpha) + "; "
              + (f"classes whose AUROC differs significantly: {', '.join(significant)}." if significant
                 else "no class's AUROC differs significantly (Holm-adjusted).")]
    return "\n".join(lines)
