"""Self-describing model bundles: `model.safetensors` + `metadata.json` (MONAI-bundle style).

The metadata carries everything needed to reproduce predictions without training code: the class list, the
architecture, the HU windows, the slice preprocessing, the slice->volume aggregation, the per-class calibration,
validation metrics, versions and the source run. Weights are safetensors (no pickle at all); Lightning
checkpoints are read with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
import torchvision

from ctplatform.atomic import write_atomic, write_json_atomic
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.calibration import Calibration
from ctplatform.model.classifier import build_classifier
from ctplatform.model.windows import window_table

if TYPE_CHECKING:
    from ctplatform.model.bundle_check import BundleSummary

BUNDLE_FORMAT = "ctplatform-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


class BundleError(ValueError):
    """A bundle or checkpoint that cannot be loaded safely; the message names the file and the problem."""


@dataclass
class ModelSpec:
    """What a model needs besides its weights (the serialisable part of a bundle)."""

    architecture: dict[str, Any]  # build_classifier (or build_mil_model) kwargs plus "head"
    input_windows: str
    preprocess: dict[str, Any]  # PreprocessSettings.to_dict()
    aggregation: str = "mean"
    topk: int = 3
    calibration: Calibration | None = None
    metrics: dict[str, Any] | None = None
    source: dict[str, Any] | None = None

    def build_model(self) -> torch.nn.Module:
        architecture = {k: v for k, v in self.architecture.items() if k != "weights"}  # weights come from the bundle
        head = architecture.pop("head", "slice")
        if head == "attention-mil":
            from ctplatform.model.mil import build_mil_model

            return build_mil_model(**architecture, weights="none")
        return build_classifier(**architecture, weights="none")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("ctplatform")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        own = "unknown"
    versions = {"ctplatform": own, "torch": torch.__version__, "torchvision": torchvision.__version__}
    with contextlib.suppress(PackageNotFoundError):  # timm is a dependency; a source tree may lack its metadata
        versions["timm"] = version("timm")
    return versions


def export_bundle(out_dir: str | Path, model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write `model.safetensors` then `metadata.json` (metadata last: a bundle with metadata is complete)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(".lora_" in k for k in model.state_dict()) or any(k.startswith("lora_") for k in spec.architecture):
        raise BundleError(f"{out}: merge the LoRA adapters (model.merge_lora(), as load_bundle does) before export: "
                          "a bundle holds the plain architecture")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / WEIGHTS_FILE, lambda handle: handle.write(safetensors.torch.save(state)))
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "class_names": list(CLASS_NAMES),
        "architecture": spec.architecture,
        "input": {"windows": spec.input_windows, "window_table": window_table(spec.input_windows),
                  "slices": "int16 Hounsfield units, (K, S, S)"},
        "preprocess": spec.preprocess,
        "aggregation": {"method": spec.aggregation, "topk": spec.topk},
        "calibration": spec.calibration.to_dict() if spec.calibration is not None else None,
        "metrics": spec.metrics or {},
        "versions": _versions(),
        "source": spec.source or {},
    }
    write_json_atomic(out / METADATA_FILE, metadata)
    return out


def bundle_folder(path: str | Path) -> Path:
    """A bundle folder (or its metadata.json) -> the folder, resolved; BundleError when it is not a bundle folder."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == METADATA_FILE:
        folder = folder.parent
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder (a folder with {WEIGHTS_FILE} and {METADATA_FILE}, as "
                          "train and tune export them)")
    for name in (METADATA_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise BundleError(f"{folder}: no {name} here; not a model bundle")
    return folder.resolve()


def load_bundle(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a bundle folder (or its metadata.json) or a Lightning checkpoint; returns (model in eval mode, spec)."""
    path = Path(path)
    if path.is_dir() or path.name == METADATA_FILE:
        from ctplatform.model.bundle_check import check_bundle

        return load_checked_bundle(check_bundle(path))  # schema, calibration, weights header against architecture
    if path.is_file():
        state, spec = _read_lightning_checkpoint(path)
        return _model_with(state, spec, path)
    raise BundleError(f"{path}: no such bundle or checkpoint")


def load_checked_bundle(summary: BundleSummary) -> tuple[torch.nn.Module, ModelSpec]:
    """(model in eval mode, spec) of a bundle that `check_bundle` has passed (its BundleSummary)."""
    from ctplatform.model.bundle_check import spec_from_metadata

    weights = summary.folder / WEIGHTS_FILE
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise BundleError(f"{weights}: unreadable weights ({exc})") from exc
    spec = spec_from_metadata(summary.metadata)
    return _model_with(state, spec, summary.folder)


def _model_with(state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> tuple[torch.nn.Module, ModelSpec]:
    model = spec.build_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{path}: weights do not fit the architecture (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    if any(key.startswith("lora_") for key in spec.architecture):
        # A checkpoint trained with LoRA: fold the adapters into the weights now, so the model (and any bundle
        # exported from it) is the plain architecture that serving builds without peft.
        model.merge_lora()
        spec.architecture = {k: v for k, v in spec.architecture.items() if not k.startswith("lora_")}
    return model.eval(), spec


def _read_lightning_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BundleError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                          f"data (weights_only=True), which could run code ({str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise BundleError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "config" not in hparams:
        raise BundleError(f"{path}: not a ctplatform Lightning checkpoint (no hyper_parameters.config)")
    config = hparams["config"]
    architecture = {"head": config.get("head", "slice"), "model": config["model"],
                    "use_attention": config["use_attention"], "use_multiscale": config["use_multiscale"],
                    "num_classes": len(CLASS_NAMES)}
    if architecture["head"] == "attention-mil":
        architecture.update(mil_pooling=config.get("mil_pooling", "per-class"),
                            mil_hidden=config.get("mil_hidden", 128))
    if int(config.get("lora_rank", 0)) > 0:  # adapters to rebuild before the weights load; merged right after
        architecture.update(lora_rank=int(config["lora_rank"]), lora_alpha=float(config.get("lora_alpha", 16.0)),
                            lora_targets=config.get("lora_targets", "auto"))
    spec = ModelSpec(
        architecture=architecture,
        input_windows=config["input_windows"],
        preprocess=hparams.get("preprocess") or {},
        aggregation=config.get("aggregation", "mean"),
        topk=int(config.get("topk", 3)),
        source={"checkpoint": str(path), "epoch": checkpoint.get("epoch"), "run_name": config.get("run_name")},
    )
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return state, spec
