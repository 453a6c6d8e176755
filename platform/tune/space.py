"""Search spaces read from YAML into an Optuna define-by-run function (conditional parameters allowed)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ctplatform.config import TrainConfig

TYPES = ("categorical", "float", "int")


@dataclass(frozen=True)
class SearchSpace:
    metric: str
    mode: str
    params: dict[str, dict[str, Any]]

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run: sample each parameter whose `when` condition holds (in file order)."""
        chosen: dict[str, Any] = {}
        for name, spec in self.params.items():
            condition = spec.get("when", {})
            if any(chosen.get(key, object()) not in values for key, values in condition.items()):
                continue
            kind = spec["type"]
            if kind == "categorical":
                chosen[name] = trial.suggest_categorical(name, spec["choices"])
            elif kind == "float":
                chosen[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
            else:
                chosen[name] = trial.suggest_int(name, spec["low"], spec["high"], step=int(spec.get("step", 1)))


PACKAGED_SPACES = ("default_space.yaml", "demo_space.yaml")


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and validate a space file; None reads the packaged default (a packaged name reads that file)."""
    if path is None or str(path) in PACKAGED_SPACES:
        where = str(path or "default_space.yaml")
        text = resources.files("ctplatform.tune").joinpath(where).read_text()
    else:
        text, where = Path(path).read_text(), str(path)
    raw = yaml.safe_load(text) or {}
    known = {f.name for f in fields(TrainConfig)}
    params = raw.get("params") or {}
    if not params:
        raise ValueError(f"{where}: no params to search")
    for name, spec in params.items():
        if name not in known:
            raise ValueError(f"{where}: {name!r} is not a training setting (TrainConfig field)")
        if spec.get("type") not in TYPES:
            raise ValueError(f"{where}: {name}: type must be one of {', '.join(TYPES)}")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ValueError(f"{where}: {name}: categorical needs choices")
        if spec["type"] != "categorical" and not ("low" in spec and "high" in spec and spec["low"] < spec["high"]):
            raise ValueError(f"{where}: {name}: needs low < high")
        for key in spec.get("when", {}):
            if key not in params or list(params).index(key) > list(params).index(name):
                raise ValueError(f"{where}: {name}: condition on {key!r}, which must be a parameter listed before it")
    mode = raw.get("mode", "max")
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be min or max")
    return SearchSpace(metric=raw.get("metric", "val/volume_auroc"), mode=mode, params=params)
