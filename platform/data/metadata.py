"""Read CT-RATE's `metadata/{train,validation}_metadata.csv` (44 columns) into per-volume geometry and rescale.

Only the columns the pipeline needs are interpreted; the rest are kept out of memory. `XYSpacing` is a string such
as "[0.341796875, 0.341796875]"; `ZSpacing` is a float that is sometimes empty/NaN. Fallback for a missing
ZSpacing (stated here once): the NIfTI header's slice spacing, and when that is missing too, 1.0 mm with a warning
(spacing is recorded with the cache; slice selection is by index, so a wrong guess never drops data).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

from ctplatform.data.errors import DataFormatError
from ctplatform.labels import volume_stem

NEEDED_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
OPTIONAL_COLUMNS = ("ImageOrientationPatient", "PatientSex", "PatientAge", "Manufacturer", "Rows", "Columns",
                    "NumberofSlices")
DEFAULT_Z_SPACING_MM = 1.0


@dataclass(frozen=True)
class VolumeMetadata:
    volume_name: str
    rescale_slope: float | None
    rescale_intercept: float | None
    xy_spacing: tuple[float, float] | None
    z_spacing: float | None  # None where the CSV has NaN/empty
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines

    @property
    def has_rescale(self) -> bool:
        return self.rescale_slope is not None and self.rescale_intercept is not None


def _float_or_none(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    value = float(text)
    return None if math.isnan(value) else value


def _float_list(text: str, length: int) -> tuple[float, ...] | None:
    text = text.strip()
    if not text:
        return None
    values = ast.literal_eval(text)  # a literal list such as "[0.34, 0.34]"; never eval
    values = tuple(float(v) for v in values)
    if len(values) != length:
        raise ValueError(f"expected {length} numbers, got {len(values)}")
    return values


def read_metadata_csv(path: str | Path) -> dict[str, VolumeMetadata]:
    """Return VolumeMetadata keyed by volume stem (`train_1_a_1`, no extension)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "metadata file not found")
    import pandas as pd  # here, not at the top: a Ray worker unpickling VolumeMetadata needs no pandas

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in NEEDED_COLUMNS:
        if column not in frame.columns:
            raise DataFormatError(path, "missing metadata column", column=column)
    result: dict[str, VolumeMetadata] = {}
    for i, row in enumerate(frame.itertuples(index=False)):
        record = row._asdict()
        name = record["VolumeName"].strip()
        column = ""
        try:
            column = "RescaleSlope"
            slope = _float_or_none(record["RescaleSlope"])
            column = "RescaleIntercept"
            intercept = _float_or_none(record["RescaleIntercept"])
            column = "XYSpacing"
            xy = _float_list(record["XYSpacing"], 2)
            column = "ZSpacing"
            z = _float_or_none(record["ZSpacing"])
            column = "ImageOrientationPatient"
            orientation = (
                _float_list(record["ImageOrientationPatient"], 6) if "ImageOrientationPatient" in record else None
            )
        except (ValueError, SyntaxError, TypeError) as exc:
            raise DataFormatError(path, f"unreadable value ({exc})", column=column, row=i + 2) from exc
        stem = volume_stem(name)
        if stem in result:
            raise DataFormatError(path, f"duplicate VolumeName {name!r}", column="VolumeName", row=i + 2)
        result[stem] = VolumeMetadata(name, slope, intercept, xy, z, orientation)  # type: ignore[arg-type]
    return result
