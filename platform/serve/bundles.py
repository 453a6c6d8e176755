"""Which bundle to serve and what it is: the default bundle, light metadata checks, a content version (no Ray)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import BUNDLE_FORMAT, METADATA_FILE, WEIGHTS_FILE, BundleError

DEFAULT_RUNS_DIR = "runs"


def default_bundle_path(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The newest `<runs_dir>/*/best/` bundle (the latest sweep's best model), by metadata.json modification time."""
    runs = Path(runs_dir)
    candidates = sorted(runs.glob(f"*/best/{METADATA_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        raise FileNotFoundError(
            f"no model bundle found under {runs.resolve()}/*/best/ (looked for {METADATA_FILE}): pass --bundle PATH "
            "(a folder with model.safetensors and metadata.json), or run a sweep first"
        )
    return candidates[0].parent


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder (or its metadata.json) -> the folder; BundleError when it is not a bundle folder."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == METADATA_FILE:
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder (the service loads bundles exported by train/tune: a folder "
                          f"with {WEIGHTS_FILE} and {METADATA_FILE})")
    for name in (METADATA_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise BundleError(f"{path}: no {name} here; not a model bundle")
    return path.resolve()


def read_bundle_metadata(path: str | Path) -> dict:
    """metadata.json of a bundle folder, checked enough to configure the service (weights are not read)."""
    folder = resolve_bundle_dir(path)
    where = folder / METADATA_FILE
    try:
        metadata = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: unreadable JSON ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: not a ctplatform model bundle")
    if list(metadata.get("class_names", [])) != list(CLASS_NAMES):
        raise BundleError(f"{where}: the bundle's class list differs from this ctplatform's CLASS_NAMES")
    try:
        PreprocessSettings.from_dict(metadata["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: invalid preprocess settings ({exc})") from exc
    return metadata


def bundle_version(path: str | Path) -> str:
    """`sha256:<12 hex>` of metadata.json and the weights: the same files always give the same version."""
    folder = resolve_bundle_dir(path)
    digest = hashlib.sha256()
    for name in (METADATA_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:12]


def preprocess_fingerprint(preprocess: dict) -> dict:
    """Preprocess settings in canonical form (defaults filled in), for comparing ingress and model versions."""
    return PreprocessSettings.from_dict(preprocess).to_dict()
