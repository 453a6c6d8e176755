"""Which bundle to serve and what it is: the chosen or default bundle, a content version (no Ray)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ctplatform import storage
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.model.bundle import METADATA_FILE, WEIGHTS_FILE, bundle_folder

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


def chosen_bundle(path: str | Path | None, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The bundle folder to serve: `path` (a folder or its metadata.json), else the newest sweep's best bundle. A URI
    (`s3://...`) is first copied to this node's disk (once per version of its files: `storage.local_copy`)."""
    if path and storage.is_uri(str(path)):
        path = storage.local_copy(str(path))
    return bundle_folder(path) if path else default_bundle_path(runs_dir)


def bundle_version(path: str | Path) -> str:
    """`sha256:<12 hex>` of metadata.json and the weights: the same files always give the same version."""
    folder = bundle_folder(path)
    digest = hashlib.sha256()
    for name in (METADATA_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:12]


def preprocess_fingerprint(preprocess: dict) -> dict:
    """Preprocess settings in canonical form (defaults filled in), for comparing ingress and model versions."""
    return PreprocessSettings.from_dict(preprocess).to_dict()
