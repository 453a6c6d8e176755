"""Which bundle to serve and what it is: the default bundle, the checked metadata, a content version (no Ray)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ctplatform import storage
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.model.bundle import METADATA_FILE, WEIGHTS_FILE, BundleError
from ctplatform.model.bundle_check import check_bundle, validated_metadata

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
    """A bundle folder (or its metadata.json) -> the folder; BundleError when it is not a bundle folder. A URI
    (`s3://...`) is first copied to this node's disk (once per version of its files: `storage.local_copy`)."""
    if storage.is_uri(str(path)):
        path = storage.local_copy(str(path))
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
    """metadata.json of a bundle folder once the whole bundle has passed `check_bundle` (schema, calibration,
    weights header against the architecture): nothing is deployed from a bundle that would fail in a replica."""
    folder = resolve_bundle_dir(path)
    check_bundle(folder)
    return validated_metadata(folder / METADATA_FILE)


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
