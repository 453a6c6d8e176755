"""Sweep results: a trials table kept current while the sweep runs, and the final summary with plots.

The summary marks the trials whose macro AUROC is not significantly below the best trial's (``tied_with_best``;
DeLong's paired test, cluster-robust by patient, on the validation predictions each trial's best epoch was scored
on, which its checkpoint keeps: no trial is predicted again). Two trials 0.005 apart on a few thousand validation
volumes are often not different: pick among the tied ones by cost or simplicity, not by the third decimal.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path

import pandas as pd
from ray.tune import Callback

from ctplatform.atomic import write_text_atomic
from ctplatform.tune.layout import STUDY_FILE
from ctplatform.tune.space import SearchSpace


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class LiveTrialsTable(Callback):
    """Rewrites `trials.csv` (atomically) on every result, and prints one line when a trial ends: its settings and
    its best value of the sweep's metric (the whole table is in `trials.csv` and in the summary at the end)."""

    def __init__(self, path: Path | None, space: SearchSpace, max_epochs: int):
        self.path, self.space, self.max_epochs = path, space, max_epochs
        self.rows: dict[str, dict] = {}

    def _update(self, trial, result: dict | None, state: str) -> None:
        row = self.rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id})
        row.update({k: v for k, v in trial.config.items() if k in self.space.params})
        if result is not None:
            value = _finite(result.get(self.space.metric))
            row["epochs"] = int(result.get("training_iteration", 0))
            row["last_" + self.space.metric] = value
            best = row.get("best_" + self.space.metric)
            improves = best is None or (value > best if self.space.mode == "max" else value < best)
            if value is not None and improves:
                row["best_" + self.space.metric] = value
        row["state"] = state
        if self.path is not None:
            write_text_atomic(self.path, pd.DataFrame(list(self.rows.values())).to_csv(index=False))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, result, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = self.rows.get(trial.trial_id, {}).get("epochs", 0)
        self._update(trial, None, "finished" if epochs >= self.max_epochs else "stopped early")
        self._print(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, None, "error")
        self._print(trial.trial_id)

    def _print(self, trial_id: str) -> None:
        row = self.rows[trial_id]
        settings = ", ".join(f"{k}={_short(row[k])}" for k in self.space.params if k in row and _present(row[k]))
        best = row.get("best_" + self.space.metric)
        value = f"best {self.space.metric} {best:.4f}" if best is not None else f"no {self.space.metric}"
        print(f"trial {trial_id} {row['state']} after {row.get('epochs', 0)} epoch(s): {value}  ({settings})",
              flush=True)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def error_line(error: BaseException) -> str:
    """One line saying why a trial failed. Ray wraps the cause in its traceback text; the innermost exception line
    there is the reason (e.g. Ray Train's "The worker group startup timed out after 60.0 seconds waiting for 1
    workers"), without Ray's generic advice after it."""
    lines = str(error).splitlines()
    name, text = type(error).__name__, next((line.strip() for line in lines if line.strip()), "")
    for i in range(len(lines) - 1, -1, -1):
        match = re.match(r"^([\w.]+(?:Error|Exception)): ?(.*)$", lines[i])
        if match:
            name, text = match[1].rsplit(".", 1)[-1], match[2].strip()
            if (not text or text.endswith(":")) and i + 1 < len(lines):
                text = f"{text} {lines[i + 1].strip()}".strip()
            break
    return f"{name}: {text.split(' Potential causes')[0]}"[:300]


def trials_frame(results, space: SearchSpace, max_epochs: int) -> pd.DataFrame:
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        values = frame[space.metric].dropna() if frame is not None and space.metric in frame else pd.Series([])
        best = values.max() if space.mode == "max" else values.min()
        epochs = int(frame["training_iteration"].max()) if frame is not None and len(frame) else 0
        state = "error" if result.error else ("finished" if epochs >= max_epochs else "stopped early")
        row = {"trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name}
        row.update({k: v for k, v in (result.config or {}).items() if k in space.params})
        row.update({"best_" + space.metric: _finite(best) if len(values) else None, "epochs": epochs, "state": state,
                    "error": error_line(result.error) if result.error else ""})
        rows.append(row)
    return pd.DataFrame(rows)


def _best_epoch(result, space: SearchSpace) -> tuple[float, str, int] | None:
    """(metric, checkpoint path, epoch) of a trial's best epoch that has a checkpoint, from its metrics history."""
    frame = result.metrics_dataframe
    if frame is None or space.metric not in frame or "checkpoint_path" not in frame:
        return None
    frame = frame.dropna(subset=[space.metric, "checkpoint_path"])
    if frame.empty:
        return None
    index = frame[space.metric].idxmax() if space.mode == "max" else frame[space.metric].idxmin()
    return (float(frame.loc[index, space.metric]), str(frame.loc[index, "checkpoint_path"]),
            int(frame.loc[index, "training_iteration"]))


def best_checkpoint(results, space: SearchSpace) -> tuple[str | None, dict]:
    """The checkpoint of the best epoch (not the last) of the best trial, from its metrics history."""
    best_value, best_path, best_row = None, None, {}
    for result in results:
        best = _best_epoch(result, space)
        if best is None:
            continue
        value, path, epoch = best
        if best_value is None or (value > best_value if space.mode == "max" else value < best_value):
            best_value, best_path = value, path
            best_row = {"best_trial": Path(result.path).name, "best_epoch": epoch,
                        "best_" + space.metric: value, "best_config": {k: v for k, v in result.config.items()
                                                                      if k in space.params}}
    return best_path, best_row


def read_validation_predictions(checkpoint_dir: str) -> dict | None:
    """The validation predictions a trial's checkpoint keeps (None for a URI, a missing file or an older
    checkpoint without them). Memory-mapped: only the predictions are read, not the weights."""
    import torch

    from ctplatform.train.module import VALIDATION_PREDICTIONS_KEY

    path = Path(checkpoint_dir) / "checkpoint.ckpt"
    if "://" in checkpoint_dir or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError):
        return None
    kept = checkpoint.get(VALIDATION_PREDICTIONS_KEY)
    if kept is None:
        return None
    return {**kept, "probs": kept["probs"].double().numpy(), "targets": kept["targets"].numpy()}


def mark_ties(frame: pd.DataFrame, results, space: SearchSpace, best_trial: str | None,
              alpha: float = 0.05) -> tuple[pd.DataFrame, str]:
    """Add ``tied_with_best`` (yes / no / best / n/a) and ``p_vs_best`` to the trials table; returns it and a
    one-line note."""
    from ctplatform.evaluation.compare import ties_with_best

    frame = frame.copy()
    frame["tied_with_best"], frame["p_vs_best"] = "n/a", None
    if best_trial is None or not len(frame):
        return frame, ""
    predictions, row_of = {}, {}
    for position, result in enumerate(results):
        best = _best_epoch(result, space)
        kept = read_validation_predictions(best[1]) if best is not None else None
        if kept is not None:
            predictions[Path(result.path).name] = kept
            row_of[Path(result.path).name] = frame.index[position]
    if best_trial not in predictions:
        return frame, ("tie test n/a: the best trial's checkpoint keeps no validation predictions (an object-store "
                       "URI or a checkpoint from an older version)")
    for trial, test in ties_with_best(predictions, best_trial, alpha).items():
        label = {True: "yes", False: "no", None: "n/a"}[test["tied"]]
        frame.loc[row_of[trial], ["tied_with_best", "p_vs_best"]] = ["best" if trial == best_trial else label,
                                                                      test["p"]]
    tied = int((frame["tied_with_best"] == "yes").sum())
    return frame, (f"{tied} trial(s) statistically tied with the best (macro AUROC not significantly below it: "
                   f"DeLong, patient-clustered, two-sided p >= {alpha:g})")


def _optuna_plots(sweep_dir: str, name: str, out: Path) -> list[str]:
    """Optimisation history, parameter importances, parallel coordinates (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    db = Path(sweep_dir) / STUDY_FILE
    if not db.is_file():
        return []
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    # Importances and parallel coordinates compare trials: they need two finished trials, and only parameters that
    # took two values among them (Optuna warns of equal importances and matplotlib of a flat axis otherwise).
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = sorted(p for p in {p for t in done for p in t.params}
                    if len({repr(t.params[p]) for t in done if p in t.params}) >= 2)
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(done) >= 2 and varied:
        plots += [("param_importances.png", functools.partial(ovm.plot_param_importances, params=varied)),
                  ("parallel_coordinates.png", functools.partial(ovm.plot_parallel_coordinate, params=varied))]
    written = []
    for filename, plot in plots:
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental; used knowingly here
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. too few finished trials
            print(f"skipped {filename}: {exc}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(out / filename, dpi=100, bbox_inches="tight")
        matplotlib.pyplot.close(figure)
        written.append(str(out / filename))
    return written


def write_summary(results, space: SearchSpace, max_epochs: int, sweep_dir: str, settings,
                  resources_note: str = "") -> dict:
    """The trials table and plots under <sweep>/summary, and one line per failed trial; `resources_note` (what a
    trial holds, what the cluster has) follows the failures that waited for resources."""
    frame = trials_frame(results, space, max_epochs)
    path, best = best_checkpoint(results, space)
    frame, ties_note = mark_ties(frame, results, space, best.get("best_trial"))
    summary = {"sweep_dir": sweep_dir, "trials": len(frame), "best_checkpoint": path, **best,
               "epochs_trained": int(frame["epochs"].sum()) if len(frame) else 0,
               "stopped_early": int((frame["state"] == "stopped early").sum()) if len(frame) else 0,
               "errors": int((frame["state"] == "error").sum()) if len(frame) else 0,
               "tied_with_best": frame.loc[frame["tied_with_best"] == "yes", "trial_id"].tolist() if len(frame)
               else []}
    out = Path(sweep_dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "trials.csv", frame.to_csv(index=False))
    summary["summary_dir"] = str(out)
    summary["plots"] = _optuna_plots(sweep_dir, settings.name, out)
    shown = frame.drop(columns=["error"]) if len(frame) else frame
    print("\nSweep summary\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    if ties_note:
        print(ties_note, flush=True)
    for _, row in frame[frame["state"] == "error"].iterrows() if len(frame) else ():
        waited = "worker group" in row["error"].lower() and resources_note
        print(f"trial {row['trial_id']} failed: {row['error']}" + (f" ({resources_note})" if waited else ""),
              flush=True)
    return summary
