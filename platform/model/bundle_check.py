"""Check a model bundle before anything deploys it: `metadata.json` against the versioned bundle schema, the
calibration block, and the `model.safetensors` header (tensor names, shapes, dtypes) against the architecture the
metadata declares. Nothing is loaded but the header, and the architecture is built on PyTorch's `meta` device (no
memory, no weights), so a tampered bundle is refused in about a second, with one line naming the file and the
problem, instead of failing in a Serve replica later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import safe_open

from ctplatform.config.model import AGGREGATIONS, HEADS, INPUT_WINDOWS
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    BundleError,
    ModelSpec,
    bundle_folder,
)
from ctplatform.model.calibration import Calibration

MAX_METADATA_BYTES = 1 << 20  # a real metadata.json is a few KB; refuse to parse a huge one

_NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": len(CLASS_NAMES), "maxItems": len(CLASS_NAMES)}

# Version 1 of the bundle format (what `export_bundle` writes). Keys a reader needs are required; others may be
# added by later exporters (`additionalProperties` stays open) so that older readers refuse only what they need.
BUNDLE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "class_names", "architecture", "input", "preprocess", "aggregation"],
    "properties": {
        "format": {"const": BUNDLE_FORMAT},
        "format_version": {"type": "integer", "minimum": 1, "maximum": BUNDLE_VERSION},
        "class_names": {"const": list(CLASS_NAMES)},
        "architecture": {
            "type": "object",
            "required": ["model", "num_classes"],
            "properties": {
                "head": {"enum": list(HEADS)},
                "model": {"type": "string", "minLength": 1},
                "num_classes": {"const": len(CLASS_NAMES)},
                "use_attention": {"type": "string"},
                "use_multiscale": {"type": "boolean"},
                "dropout": {"type": "number", "minimum": 0, "maximum": 1},
                "mil_hidden": {"type": "integer", "minimum": 1},
            },
        },
        "input": {"type": "object", "required": ["windows"], "properties": {"windows": {"enum": list(INPUT_WINDOWS)}}},
        "preprocess": {"type": "object"},
        "aggregation": {
            "type": "object",
            "required": ["method", "topk"],
            "properties": {"method": {"enum": list(AGGREGATIONS)}, "topk": {"type": "integer", "minimum": 1}},
        },
        "calibration": {
            "oneOf": [
                {"type": "null"},
                {"type": "object", "required": ["slope", "intercept"],
                 "properties": {"slope": _NUMBERS, "intercept": _NUMBERS, "method": {"type": "string"},
                                "clip": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5}}},
            ]
        },
        "metrics": {"type": "object"},
        "source": {"type": "object"},
    },
}


@dataclass(frozen=True)
class BundleSummary:
    """What a checked bundle holds (what `ctplatform bundle check` prints)."""

    folder: Path
    model: str
    head: str
    tensors: int
    parameters: int
    calibrated: bool
    metadata: dict = field(compare=False, repr=False)  # the validated metadata.json: nobody parses it again

    def line(self) -> str:
        return (f"{self.folder}: ok: {self.model}, {self.head} head, {len(CLASS_NAMES)} classes, {self.tensors} "
                f"tensors ({self.parameters:,} values), {'calibrated' if self.calibrated else 'not calibrated'}")


def validated_metadata(where: Path) -> dict:
    """metadata.json, parsed and checked against BUNDLE_SCHEMA; BundleError with the first problem otherwise."""
    try:
        if where.stat().st_size > MAX_METADATA_BYTES:
            raise BundleError(f"{where}: {where.stat().st_size} bytes, more than a bundle's metadata can be "
                              f"({MAX_METADATA_BYTES})")
        metadata = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: unreadable JSON ({exc})") from exc
    if isinstance(metadata, dict) and isinstance(metadata.get("format_version"), int) \
            and metadata["format_version"] > BUNDLE_VERSION:
        raise BundleError(f"{where}: bundle format {metadata['format_version']} is newer than this ctplatform reads "
                          f"({BUNDLE_VERSION}): upgrade ctplatform")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(BUNDLE_SCHEMA).iter_errors(metadata))
    if error is not None:
        if list(error.absolute_path) == ["class_names"]:
            raise BundleError(f"{where}: class_names differ from this ctplatform's {len(CLASS_NAMES)} CT-RATE classes "
                              "(names and order must match)")
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        raise BundleError(f"{where}: {error.json_path}: {message}")
    try:
        PreprocessSettings.from_dict(metadata["preprocess"])
        if metadata.get("calibration"):
            Calibration.from_dict(metadata["calibration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: invalid preprocess or calibration block ({exc})") from exc
    return metadata


def weights_header(where: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, reading no tensor data."""
    try:
        with safe_open(str(where), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape())
                    for name in weights.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as exc:  # safetensors raises its own error types for a corrupt header or a short file
        raise BundleError(f"{where}: unreadable weights ({str(exc).splitlines()[0] if str(exc) else type(exc)})") \
            from exc


def check_bundle(path: str | Path) -> BundleSummary:
    """Validate the bundle folder (or its metadata.json) at `path`; BundleError naming the file and the problem."""
    folder = bundle_folder(path)
    metadata = validated_metadata(folder / METADATA_FILE)
    stored = weights_header(folder / WEIGHTS_FILE)
    spec = spec_from_metadata(metadata)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            expected = {name: tuple(t.shape) for name, t in spec.build_model().state_dict().items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{folder / METADATA_FILE}: architecture cannot be built ({exc})") from exc
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    if missing or unexpected:
        raise BundleError(f"{folder / WEIGHTS_FILE}: tensors do not fit the architecture in {METADATA_FILE} "
                          f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                          f"{unexpected[:2]})")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise BundleError(f"{folder / WEIGHTS_FILE}: tensor {name} has shape {list(stored[name])}, the "
                              f"architecture in {METADATA_FILE} needs {list(shape)}")
    architecture = metadata["architecture"]
    return BundleSummary(folder, architecture["model"], architecture.get("head", "slice"), len(stored),
                         sum(math.prod(shape) for shape in stored.values()), bool(metadata.get("calibration")),
                         metadata)


def spec_from_metadata(metadata: dict) -> ModelSpec:
    """The ModelSpec of validated metadata."""
    calibration = metadata.get("calibration")
    return ModelSpec(
        architecture=metadata["architecture"],
        input_windows=metadata["input"]["windows"],
        preprocess=metadata["preprocess"],
        aggregation=metadata["aggregation"]["method"],
        topk=int(metadata["aggregation"]["topk"]),
        calibration=Calibration.from_dict(calibration) if calibration else None,
        metrics=metadata.get("metrics"),
        source=metadata.get("source"),
    )
