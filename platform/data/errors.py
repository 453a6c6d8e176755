"""Errors the data layer raises: each names the file (and column/row where there is one) and the problem."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A CSV or volume file does not have the form CT-RATE files have."""

    def __init__(self, path: object, problem: str, *, column: str | None = None, row: int | None = None):
        where = str(path)
        if column is not None:
            where += f", column {column!r}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.column = column
        self.row = row


class VolumeReadError(DataFormatError):
    """A volume file cannot be read safely (truncated, too large, wrong dimensionality, unsupported type)."""
