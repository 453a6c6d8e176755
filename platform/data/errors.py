"""Errors the data layer raises, one class per kind of problem, and the one table saying how each kind is reported.

Each error names the file (and column/row where there is one) and the problem. All of them subclass
:class:`DataFormatError`, itself a `ValueError`, so a caller that only cares that the input was bad catches the
base. Callers that report errors never look at message text: the HTTP service answers `http_status(exc)`, the
command line prints `cli_prefix(exc)` before the message.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataFormatError(ValueError):
    """A CSV or volume file does not have the form CT-RATE files have (the base of every data-layer error)."""

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


class DataNotFoundError(DataFormatError):
    """The named file does not exist."""


class UnsupportedFormatError(DataFormatError):
    """Not a format the data layer reads (volumes: .nii, .nii.gz, .mha, DICOM), or a DICOM form it refuses."""


class DataTooLargeError(DataFormatError):
    """The file declares more voxels or image bytes than the read's limits allow (refused before decompressing)."""


class CorruptDataError(DataFormatError):
    """A supported format, but the file is empty, truncated, or its header or compressed data is malformed."""


class UnusableContentError(DataFormatError):
    """A well-formed file whose content cannot be used: not 3-D, an unsupported voxel type, NaN values or spacing,
    a blank image, no lung field (not a chest CT)."""


@dataclass(frozen=True)
class ErrorKind:
    http_status: int
    cli_prefix: str


ERROR_KINDS: dict[type[DataFormatError], ErrorKind] = {
    DataNotFoundError: ErrorKind(404, "not found"),
    UnsupportedFormatError: ErrorKind(415, "unsupported format"),
    DataTooLargeError: ErrorKind(413, "too large"),
    CorruptDataError: ErrorKind(422, "corrupt file"),
    UnusableContentError: ErrorKind(422, "unusable content"),
    DataFormatError: ErrorKind(422, "bad data"),  # CSV problems and anything not of a kind above
}


def error_kind(exc: DataFormatError) -> ErrorKind:
    """The table's entry for `exc`: its own class's, else its nearest base class's."""
    for cls in type(exc).__mro__:
        if cls in ERROR_KINDS:
            return ERROR_KINDS[cls]
    raise TypeError(f"{type(exc).__name__} is not a data-layer error (DataFormatError)")


def http_status(exc: DataFormatError) -> int:
    """The HTTP status the service answers for `exc` (404, 413, 415 or 422)."""
    return error_kind(exc).http_status


def cli_prefix(exc: DataFormatError) -> str:
    """The short kind the command line prints before the message, e.g. 'too large'."""
    return error_kind(exc).cli_prefix
