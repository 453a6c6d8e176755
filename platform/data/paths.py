"""Find CT-RATE files on disk: volumes from a VolumeName, label and metadata CSVs from a data directory.

Layouts understood (CT-RATE's published folder structure):
- nested: `{root}/{split}/{split}_{patient}/{split}_{patient}_{scan}/{name}.nii.gz`, with `split` in
  train/valid and the v2 re-upload's `train_fixed`/`valid_fixed` trees beside them;
- flat: every volume directly in one folder (`{root}/{name}.nii.gz`, `.nii` or `.mha`).
A DICOM series is a folder named by the VolumeName (holding the series' files, in any subfolders) or a `.zip` of
one (`{root}/{name}.zip`), in either layout; an Enhanced CT volume is `{name}.dcm`. A name found in neither layout
is looked for anywhere in the tree (:class:`VolumeFinder`: a folder, zip or volume file of that name, which must be
the only one).
`root` may be the data directory itself or its `dataset/` subfolder, as in the Hugging Face download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ctplatform.data.errors import DataFormatError
from ctplatform.labels import volume_stem

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".zip", ".dcm")
_NAME = re.compile(r"^(?P<split>train|valid)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)$")


@dataclass(frozen=True)
class VolumeId:
    split: str  # "train" or "valid"
    patient: str  # "train_1": the unit that must never straddle a split
    scan: str  # "train_1_a"
    stem: str  # "train_1_a_1"


def parse_volume_name(name: str) -> VolumeId | None:
    """Parse a CT-RATE VolumeName; None for names of another form (challenge UUIDs, user files)."""
    stem = volume_stem(name)
    match = _NAME.match(stem)
    if not match:
        return None
    split, patient, scan = match["split"], match["patient"], match["scan"]
    return VolumeId(split, f"{split}_{patient}", f"{split}_{patient}_{scan}", stem)


def dataset_root(data_dir: str | Path) -> Path:
    """The folder holding `train/`, `multi_abnormality_labels/` ...: `data_dir/dataset` when it exists."""
    data_dir = Path(data_dir)
    nested = data_dir / "dataset"
    return nested if nested.is_dir() else data_dir


def volume_candidates(root: Path, name: str) -> list[Path]:
    """Every place a volume may be, most specific first; the last ones (no suffix) are DICOM series folders."""
    stem = volume_stem(name)
    ident = parse_volume_name(stem)
    candidates: list[Path] = []
    for suffix in (*VOLUME_SUFFIXES, ""):
        if ident is not None:
            for tree in (ident.split, f"{ident.split}_fixed"):
                candidates.append(root / tree / ident.patient / ident.scan / f"{stem}{suffix}")
        candidates.append(root / f"{stem}{suffix}")
    return candidates


def find_volume(root: str | Path, name: str) -> Path | None:
    """The path of volume `name` under `root` (nested or flat layout; a file, or a DICOM series folder), or None."""
    stem = volume_stem(name)
    for candidate in volume_candidates(Path(root), name):
        if candidate.is_file() or (candidate.name == stem and candidate.is_dir()):
            return candidate
    return None


class VolumeFinder:
    """`find_volume`, then, for names found in neither layout, one walk of the whole tree (made on first need)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._tree: dict[str, list[Path]] | None = None

    def find(self, name: str) -> Path | None:
        path = find_volume(self.root, name)
        if path is not None:
            return path
        if self._tree is None:
            self._tree = _index_tree(self.root)
        matches = self._tree.get(volume_stem(name), [])
        if len(matches) > 1:
            shown = ", ".join(str(m.relative_to(self.root)) for m in matches[:3])
            raise DataFormatError(self.root, f"volume {name!r} matches {len(matches)} paths ({shown}): give each "
                                             "folder or file a unique name")
        return matches[0] if matches else None


def _index_tree(root: Path) -> dict[str, list[Path]]:
    """Every folder and volume file under `root` by its VolumeName stem (label and metadata folders left out)."""
    tree: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.name in ("multi_abnormality_labels", "metadata") or path.is_symlink():
            continue
        if path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES):
            tree.setdefault(volume_stem(path.name), []).append(path)
    return tree


def find_label_files(data_dir: str | Path) -> dict[str, Path]:
    """Label CSVs by split: CT-RATE's per-split files, else a single `multi_abnormality_labels.csv` (the legacy layout)
    (split then taken from each VolumeName). Key "all" marks the single-file case."""
    root = dataset_root(data_dir)
    found: dict[str, Path] = {}
    for split in ("train", "valid"):
        path = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        if path.is_file():
            found[split] = path
    if not found:
        for candidate in (Path(data_dir) / "multi_abnormality_labels.csv", root / "multi_abnormality_labels.csv"):
            if candidate.is_file():
                return {"all": candidate}
    return found


def find_metadata_files(data_dir: str | Path) -> list[Path]:
    root = dataset_root(data_dir)
    return [
        p
        for p in (root / "metadata" / "train_metadata.csv", root / "metadata" / "validation_metadata.csv")
        if p.is_file()
    ]
