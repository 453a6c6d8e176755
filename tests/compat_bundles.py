"""Bundles as written before the code was split by concern: their metadata.json files (tests/data/bundles_v1) and
deterministic weights rebuilt from the recorded tensor names and shapes, so a test can check that the current
code loads them and predicts what the code that wrote them predicted."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).parent / "data" / "bundles_v1"


def deterministic_weights(shapes: dict[str, list]) -> dict[str, torch.Tensor]:
    """Small, varied, reproducible values; BatchNorm variances positive."""
    tensors = {}
    for k, (name, (shape, dtype)) in enumerate(sorted(shapes.items())):
        count = int(np.prod(shape)) if shape else 1
        if dtype.startswith("torch.int"):
            tensors[name] = torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[1]))
            continue
        values = torch.sin(torch.arange(count, dtype=torch.float64) * 0.37 + k).reshape(shape)
        if name.endswith("running_var"):
            values = 1.0 + 0.1 * values.abs()
        elif name.endswith(("running_mean", "bias")):
            values = 0.01 * values
        else:
            values = 0.05 * values
        tensors[name] = values.to(torch.float32)
    return tensors


def build_bundle(name: str, out_dir: Path) -> Path:
    """Write the recorded bundle `name` (metadata.json + deterministic model.safetensors) into out_dir/name."""
    source = FIXTURES / name
    target = out_dir / name
    target.mkdir(parents=True)
    (target / "metadata.json").write_text((source / "metadata.json").read_text())
    shapes = json.loads((source / "tensors.json").read_text())
    save_file(deterministic_weights(shapes), str(target / "model.safetensors"))
    return target


def probe_slices() -> tuple[np.ndarray, np.ndarray]:
    """Prepared int16 HU slices (6, 32, 32) and their source positions: what a cache holds for one volume."""
    rng = np.random.default_rng(7)
    slices = np.full((6, 32, 32), -1000, np.int16)
    slices[:, 4:-4, 4:-4] = rng.integers(-900, 400, (6, 24, 24))
    return slices, np.arange(0, 12, 2)
