"""Read abnormality label CSVs onto the one ordered class list (`ctplatform.labels.CLASS_NAMES`).

Accepts CT-RATE's `multi_abnormality_labels/{train,valid}_predicted_labels.csv` and the legacy layout's
`multi_abnormality_labels.csv`: the same 18 class names, in any column order. Columns are matched by exact name,
never by position, and every deviation is an error that names the file, the column and the row.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from ctplatform.data.errors import DataFormatError
from ctplatform.labels import CLASS_NAMES, VOLUME_COLUMN


def read_labels_csv(path: str | Path, class_names: tuple[str, ...] = CLASS_NAMES) -> pd.DataFrame:
    """Return a frame indexed by VolumeName with one int8 column per class, in `class_names` order.

    Row numbers in errors are 1-based file lines (the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "labels file not found")
    try:
        # Read the header ourselves: pandas silently renames duplicated columns ("X" -> "X.1").
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(path, f"not a readable CSV ({exc})") from exc
    header = [str(h).strip() for h in header]
    if VOLUME_COLUMN not in header:
        raise DataFormatError(path, f"missing the {VOLUME_COLUMN!r} column", column=VOLUME_COLUMN)
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataFormatError(path, "duplicated column", column=name)
        seen.add(name)
    unknown = [h for h in header if h != VOLUME_COLUMN and h not in class_names]
    if unknown:
        raise DataFormatError(
            path, "unknown class column (class names must match the CT-RATE names exactly)", column=unknown[0]
        )
    missing = [c for c in class_names if c not in header]
    if missing:
        raise DataFormatError(path, "missing class column", column=missing[0])

    frame.columns = header
    names = frame[VOLUME_COLUMN].str.strip()
    empty = np.flatnonzero((names == "").to_numpy())
    if empty.size:
        raise DataFormatError(path, "empty VolumeName", column=VOLUME_COLUMN, row=int(empty[0]) + 2)
    duplicated = np.flatnonzero(names.duplicated().to_numpy())
    if duplicated.size:
        row = int(duplicated[0])
        raise DataFormatError(path, f"duplicate VolumeName {names.iloc[row]!r}", column=VOLUME_COLUMN, row=row + 2)

    values = np.zeros((len(frame), len(class_names)), dtype=np.int8)
    for j, name in enumerate(class_names):
        column = frame[name].str.strip()
        # CT-RATE writes 0/1; some exports write 0.0/1.0. Anything else is an error, not a guess.
        is_one = column.isin(("1", "1.0"))
        is_zero = column.isin(("0", "0.0"))
        bad = np.flatnonzero(~(is_one | is_zero).to_numpy())
        if bad.size:
            row = int(bad[0])
            raise DataFormatError(
                path, f"value {column.iloc[row]!r} is not 0 or 1", column=name, row=row + 2
            )
        values[:, j] = is_one.to_numpy()
    return pd.DataFrame(values, index=pd.Index(names.to_numpy(), name=VOLUME_COLUMN), columns=list(class_names))

