"""`--mode predict`: files in, per-class probabilities and decisions out (table, CSV and JSON).

`--predict-type volumes` reads .nii/.nii.gz/.mha, DICOM series (a folder or a .zip of one) and Enhanced CT .dcm
files through the training preprocessing (with `--predict-metadata`,
CT-RATE's metadata CSV gives each volume's rescale as it does for `prepare`); `slices` reads 2-D .npy HU slices
(allow_pickle=False). `--checkpoint` takes a bundle folder or a Lightning checkpoint. For an attention-MIL
bundle the JSON also holds each volume's `slice_attention` (per class, the weight of every used slice, at
`slice_positions` of the source volume): which slices drove each finding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ctplatform.atomic import write_text_atomic
from ctplatform.data import read_volume
from ctplatform.data.errors import DataFormatError
from ctplatform.data.metadata import read_metadata_csv
from ctplatform.evaluation.decision import decide
from ctplatform.evaluation.predictor import Predictor
from ctplatform.labels import CLASS_NAMES, volume_stem


def _read_slice(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataFormatError(path, f"not a readable .npy array without pickled objects ({exc})") from exc
    array = np.squeeze(array)
    if array.ndim != 2 or array.dtype.kind not in "iuf" or array.size == 0:
        raise DataFormatError(path, f"a slice must be a non-empty 2-D numeric array, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise DataFormatError(path, "slice contains NaN or infinite values")
    return array


def predict_files(checkpoint: str, inputs: list[str], predict_type: str, output: str | None = None,
                  device: str | None = None, metadata_csv: str | None = None) -> pd.DataFrame:
    """Predict `inputs`; `metadata_csv` (CT-RATE's metadata CSV) gives each volume's rescale as in `prepare`."""
    if not inputs:
        raise ValueError("--predict-input needs at least one file")
    metadata = read_metadata_csv(metadata_csv) if metadata_csv and predict_type == "volumes" else None
    if metadata is not None:
        missing = [p for p in inputs if volume_stem(p) not in metadata]
        if missing:
            raise DataFormatError(metadata_csv, f"no row for {Path(missing[0]).name}"
                                  + (f" (and {len(missing) - 1} more input(s))" if len(missing) > 1 else ""))
    predictor = Predictor.from_path(checkpoint, device=device)
    rows, details = [], []
    if predict_type == "slices":
        slices = [_read_slice(Path(p)) for p in inputs]
        raw, calibrated = predictor.predict_slices(slices)
        for path, r, c in zip(inputs, raw, calibrated, strict=True):
            rows.append((volume_stem(path), c, r))
    else:
        for path in inputs:
            volume = read_volume(path, metadata=metadata[volume_stem(path)] if metadata is not None else None)
            prediction = predictor.predict_volume(volume.hu, notes=volume.notes)
            rows.append((volume_stem(path), prediction.probabilities, prediction.raw_probabilities))
            details.append({"input": path, **prediction.to_dict()})
    table = pd.DataFrame([p for _, p, _ in rows], columns=list(CLASS_NAMES))
    table.insert(0, "VolumeName", [n for n, _, _ in rows])
    records = [
        {"input": name, "probabilities": dict(zip(CLASS_NAMES, map(float, probs), strict=True)),
         "raw_probabilities": dict(zip(CLASS_NAMES, map(float, raw), strict=True)),
         "decisions": dict(zip(CLASS_NAMES, map(bool, decide(probs)), strict=True))}
        for name, probs, raw in rows
    ]
    for record, detail in zip(records, details, strict=False):
        record.update({"key_slices": detail["key_slices"], "notes": detail["notes"]})
        if "slice_attention" in detail:  # attention-MIL: each slice's weight per finding
            record.update({"slice_positions": detail["slice_positions"], "slice_attention": detail["slice_attention"]})
    if output:
        out = Path(output)
        csv_path = out if out.suffix == ".csv" else out.with_suffix(".csv")
        decisions = pd.DataFrame(decide(table[list(CLASS_NAMES)].to_numpy()).astype(int),
                                 columns=[f"{c} (decision)" for c in CLASS_NAMES])
        write_text_atomic(csv_path, pd.concat([table, decisions], axis=1).to_csv(index=False))
        write_text_atomic(csv_path.with_suffix(".json"), json.dumps(records, indent=2) + "\n")
    return table


def format_table(table: pd.DataFrame) -> str:
    """Classes as rows, inputs as columns, positives starred: readable in a terminal for a few inputs."""
    shown = table.set_index("VolumeName")[list(CLASS_NAMES)].T
    return shown.map(lambda p: f"{p:.3f}{'*' if decide(p) else ' '}").to_string()
