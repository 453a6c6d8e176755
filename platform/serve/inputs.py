"""Untrusted upload handling for the HTTP service: body caps, multipart parsing, .npy slices, and the limits a
volume upload is read with.

No Ray and no web framework here, so every check is unit-tested in milliseconds. Each problem raises
:class:`InputError` with an HTTP status and a reason a client can act on; the Serve ingress turns it into the
response. The order of the checks is the point: the body is capped while it streams in; a volume goes through
the data layer's one reader chain (`ctplatform.data.preprocess_stream`, a plane at a time) with this service's
:class:`ServeLimits`, which checks the voxel count and image bytes its header declares before anything else is
decompressed and then inflates exactly the declared bytes (a gzip bomb's tail is never inflated); a `.zip` of a
DICOM series has its entry count and total uncompressed size checked, and path traversal, symlinks and nested
archives refused, before any member is inflated; the reader's typed error becomes its status through
`ctplatform.data.errors.http_status`. `.npy` headers are parsed before the data, and arrays are loaded with
``allow_pickle=False``.

Status codes: 400 malformed request (empty body, broken multipart, wrong number of files), 413 too large (body,
declared voxels or bytes, slice count), 415 not a supported file format, 422 a supported format with unusable
content (truncated, wrong dimensionality or dtype, NaN values or spacing, blank image).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np

from ctplatform.config.serve import ServeConfig
from ctplatform.data import ReadLimits
from ctplatform.data.errors import DataFormatError, http_status
from ctplatform.data.preprocess_stream import HeldVolume, ScannedVolume, open_for_preprocessing
from ctplatform.data.readers.file_range import FileRange

MiB = 1 << 20
NPY_MAGIC = b"\x93NUMPY"
MULTIPART_CHUNK = 1 << 20  # bytes of a body the multipart parser is given at a time


class InputError(Exception):
    """A request the service refuses: `status` is the HTTP status, `reason` what was wrong."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ServeLimits:
    """Caps on what one request may make the service read, decompress and hold in memory."""

    # Serve carries a request body from its proxy to the ingress through the node's object store, a copy of about
    # the body's size that the service cannot bound (benchmarks/serve_memory.py), so the cap is set by it: the
    # largest upload grows the proxy and the ingress (its decode too) each by under 256 MB. A larger volume is read
    # by URI (POST /v1/predict/object), which Serve never carries.
    max_body_bytes: int = 96 * MiB
    max_object_bytes: int = 2048 * MiB  # read by URI: streamed to disk by the ingress, bounded like any upload
    # 1024 x 1024 x 400 voxels: every CT-RATE volume (at most 1024^2 x ~330) fits; float32 HU then take 1.6 GiB.
    max_voxels: int = 1024 * 1024 * 400
    max_decompressed_bytes: int = 2048 * MiB  # image bytes a header may declare (what the reader inflates)
    max_series_files: int = 2048  # files in a DICOM series .zip (CT-RATE's series have at most ~330 slices)
    max_files: int = 64  # multipart parts per request
    max_slices: int = 256  # 2-D slices per /v1/predict/slices request
    max_slice_side: int = 2048
    min_slice_side: int = 8
    body_timeout_s: float = 60.0  # the whole body within this (408 after)
    min_body_rate: float = 64 * 1024  # bytes/s on average after the grace period (408 below)
    # A client's first seconds may be slow (TCP slow start, a proxy's buffering): the minimum rate applies after them.
    body_grace_s: float = 5.0
    # A body above this is written to a temporary file as it arrives (node-local disk) and read from there, a
    # multipart part as a window of that file: only this much of one upload is ever held in memory.
    spool_threshold_bytes: int = 4 * MiB
    max_inflight_body_bytes: int = 2048 * MiB  # bodies (up to the spool threshold) held in memory at once (503 beyond)
    max_inflight_spool_bytes: int = 8192 * MiB  # bodies spooled to disk at once by one ingress replica (503 beyond)
    # Volume decoding one request may hold, from the header (`data/decode_memory.py`; 413 beyond): a streamed volume
    # is estimated at ~140 MiB at most within the other caps, most volumes read whole (non-axial, Enhanced CT) more.
    max_request_decode_bytes: int = 256 * MiB
    max_inflight_decode_bytes: int = 2048 * MiB  # decoding one replica admits at once, shares summed (503 beyond)

    def __post_init__(self):
        if min(self.max_body_bytes, self.max_object_bytes, self.max_voxels, self.max_decompressed_bytes,
               self.max_files, self.max_slices, self.max_slice_side, self.min_slice_side, self.max_series_files,
               self.body_timeout_s, self.min_body_rate, self.max_inflight_body_bytes, self.body_grace_s,
               self.max_inflight_decode_bytes, self.max_request_decode_bytes, self.spool_threshold_bytes,
               self.max_inflight_spool_bytes) <= 0:
            raise ValueError("every serve limit must be a positive number")
        if self.max_inflight_body_bytes < min(self.max_body_bytes, self.spool_threshold_bytes):
            raise ValueError("the in-flight body budget must hold at least one body of the spool threshold's size")
        if self.max_inflight_spool_bytes < self.max_body_bytes:
            raise ValueError("the spool budget must hold at least one body of the largest size allowed")
        if self.max_inflight_decode_bytes < self.max_request_decode_bytes:
            raise ValueError("the decode budget must hold at least one request's decode of the largest size allowed "
                             "(max_request_decode)")

    @classmethod
    def from_config(cls, config: ServeConfig) -> ServeLimits:
        return cls(max_body_bytes=int(config.max_body_mb * MiB), max_object_bytes=int(config.max_object_mb * MiB),
                   max_voxels=config.max_voxels,
                   max_decompressed_bytes=int(config.max_decompressed_mb * MiB), max_files=config.max_files,
                   max_slices=config.max_slices, max_slice_side=config.max_slice_side,
                   min_slice_side=config.min_slice_side, body_timeout_s=config.body_timeout,
                   min_body_rate=config.min_body_rate_kib * 1024,
                   max_inflight_body_bytes=int(config.max_inflight_body_mb * MiB),
                   max_inflight_decode_bytes=int(config.max_inflight_decode_mb * MiB),
                   max_request_decode_bytes=int(config.max_request_decode_mb * MiB),
                   spool_threshold_bytes=int(config.spool_threshold_mb * MiB),
                   max_inflight_spool_bytes=int(config.max_inflight_spool_mb * MiB))

    @property
    def read_limits(self) -> ReadLimits:
        """The volume reader's share: header caps checked before inflating, and a finite, positive spacing."""
        return ReadLimits(max_voxels=self.max_voxels, max_decompressed_bytes=self.max_decompressed_bytes,
                          require_spacing=True, max_series_files=self.max_series_files,
                          max_series_bytes=self.max_decompressed_bytes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Upload:
    """One uploaded file: multipart part or the raw request body, as a FileRange of the body (in memory or spooled
    to disk; bytes given here are wrapped in one)."""

    filename: str
    content: FileRange
    field: str = "file"
    content_type: str = "application/octet-stream"

    def __post_init__(self):
        if not isinstance(self.content, FileRange):
            self.content = FileRange(self.content, name=self.filename)


# ------------------------------------------------------------------------------------------------ body
UPLOAD_TOO_LARGE = "send a larger volume by its object-store URI (POST /v1/predict/object) where the service allows it"


def check_content_length(headers: dict[str, str] | None, limits: ServeLimits,
                         too_large: str = UPLOAD_TOO_LARGE) -> int | None:
    """Refuse a body whose declared Content-Length is above the cap (413 ending with `too_large`), before reading."""
    value = (headers or {}).get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InputError(400, f"invalid Content-Length header {value[:40]!r}") from None
    if length < 0:
        raise InputError(400, "invalid Content-Length header (negative)")
    if length > limits.max_body_bytes:
        raise body_too_large(f"request body of {length:,} bytes", limits, too_large)
    return length


def body_too_large(what: str, limits: ServeLimits, too_large: str = UPLOAD_TOO_LARGE) -> InputError:
    return InputError(413, f"{what} is above the limit of {limits.max_body_bytes:,} bytes: {too_large}")


def parse_multipart(body: FileRange | bytes, content_type: str, limits: ServeLimits) -> list[Upload]:
    """Parse a complete multipart/form-data body; returns the file parts (parts with a filename) in order, each a
    window of the body (the body is read a chunk at a time, never held whole)."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    body = body if isinstance(body, FileRange) else FileRange(body)
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError(400, "multipart/form-data without a boundary parameter")
    parts: list[_Part] = []
    state: dict = {"field": b"", "value": b"", "ended": False, "chunk": b"", "at": 0}

    def on_part_begin():
        if len(parts) >= limits.max_files:
            raise InputError(413, f"more than {limits.max_files} parts in one request")
        parts.append(_Part())

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1].headers[state["field"].strip().lower()] = state["value"].strip()
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        parts[-1].add(data, start, end, state["chunk"], state["at"])

    def on_end():
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_end": on_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        with body.open() as stream:
            while chunk := stream.read(MULTIPART_CHUNK):
                state["chunk"] = chunk
                parser.write(chunk)
                state["at"] += len(chunk)
        parser.finalize()
    except InputError:
        raise
    except (MultipartParseError, ValueError) as exc:
        raise InputError(400, f"malformed multipart body ({exc})") from None
    if not state["ended"]:
        raise InputError(400, "malformed multipart body (truncated: no closing boundary)")
    uploads = []
    for part in parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        if filename is None:
            continue  # a plain form field (e.g. a submit button): not a file
        name = _clean_name(filename.decode("utf-8", "replace"))
        uploads.append(Upload(
            filename=name,
            content=part.content(body, name),
            field=disposition.get(b"name", b"").decode("utf-8", "replace"),
            content_type=part.headers.get(b"content-type", b"application/octet-stream").decode("latin-1"),
        ))
    return uploads


class _Part:
    """Where one multipart part's data lies in the body. A part's data is one contiguous run of the body; the parser
    hands it over in pieces, each a slice of the chunk it was given, except a few bytes it held back as a possible
    boundary and then gives from its own buffer. The first piece from a chunk fixes the run's start; the run's
    length is the sum of the pieces. A part whose every piece came from the parser's buffer is shorter than a
    boundary: its bytes are kept."""

    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.start: int | None = None
        self.length = 0
        self.held = bytearray()

    def add(self, data, start: int, end: int, chunk: bytes, chunk_at: int) -> None:
        if self.start is None:
            if data is chunk:
                self.start = chunk_at + start - self.length
                self.held.clear()
            else:
                self.held += data[start:end]
        self.length += end - start

    def content(self, body: FileRange, name: str) -> FileRange:
        if self.start is None:
            return FileRange(bytes(self.held), name=name)
        return body.window(self.start, self.length, name)


def _clean_name(name: str) -> str:
    """The last path component, printable, at most 200 characters (a name is echoed back, never used as a path)."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:200] or "upload"


def uploads_from_body(body: FileRange | bytes, content_type: str | None, filename: str | None,
                      limits: ServeLimits) -> list[Upload]:
    """The files of a request: multipart parts (windows of the body), or the raw body as one file named by
    `filename`."""
    body = body if isinstance(body, FileRange) else FileRange(body)
    if not body.size:
        raise InputError(400, "empty request body: upload a file (multipart field 'file' or the raw bytes)")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        uploads = parse_multipart(body, content_type or "", limits)
        if not uploads:
            raise InputError(400, "the multipart body holds no file part")
        return uploads
    if media in ("application/x-www-form-urlencoded", "text/plain", "application/json"):
        raise InputError(415, f"unsupported Content-Type {media!r}: send multipart/form-data or the raw file bytes "
                              "as application/octet-stream")
    name = _clean_name(filename or "upload")
    return [Upload(filename=name, content=body.window(0, body.size, name), content_type=media or "")]


def single_upload(uploads: list[Upload]) -> Upload:
    if len(uploads) != 1:
        raise InputError(400, f"send exactly one volume per request, got {len(uploads)} files")
    return uploads[0]


# ------------------------------------------------------------------------------------------------ volumes
def decode_volume(upload: Upload, limits: ServeLimits) -> ScannedVolume | HeldVolume:
    """Bytes of a .nii / .nii.gz / .mha / DICOM (.zip of a series, Enhanced CT .dcm) upload -> a checked volume ready
    to prepare: NIfTI and MetaImage scanned a plane at a time, a DICOM series `.zip` a member at a time (never held
    whole: memory bounded whatever the upload declares); a non-axial volume or an Enhanced CT file held in its stored
    values. Raises InputError, never anything else."""
    name = upload.filename
    content = upload.content
    if not content.size:
        raise InputError(400, f"{name}: empty file")
    if content.head(len(NPY_MAGIC)) == NPY_MAGIC:
        raise InputError(415, f"{name}: a .npy array is not a volume: send .npy slices to /v1/predict/slices, or "
                              "the volume as .nii, .nii.gz, .mha or a .zip of a DICOM series")
    return as_input_errors(name, open_for_preprocessing, content, name=name, limits=limits.read_limits)


def as_input_errors(label: str, read, *args, **kwargs):
    """`read(*args, **kwargs)` with every failure of reading `label` turned into an InputError (4xx and the reason)."""
    try:
        return read(*args, **kwargs)
    except DataFormatError as exc:
        raise InputError(http_status(exc), str(exc)) from None
    except MemoryError:
        raise InputError(413, f"{label}: not enough memory to decode this volume") from None
    except Exception as exc:  # a reader bug or an input no check foresaw: a 422, never a dead replica
        raise InputError(422, f"{label}: unreadable volume ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------------ .npy slices
@dataclass
class SliceInput:
    name: str  # file name, plus [i] for the i-th slice of a 3-D stack
    hu: np.ndarray  # (H, W) float32
    notes: list[str] = field(default_factory=list)


def _npy_header(stream: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    head = stream.read(len(NPY_MAGIC))
    stream.seek(0)
    if not head.startswith(NPY_MAGIC):
        if head[:1] == b"\x80":
            raise InputError(415, f"{name}: a Python pickle, not a .npy array: pickles are refused")
        raise InputError(415, f"{name}: not a .npy file (no NumPy magic bytes)")
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError) as exc:
        raise InputError(422, f"{name}: malformed .npy header ({exc})") from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), stream.tell()


def read_npy(content: FileRange | bytes, name: str, limits: ServeLimits) -> np.ndarray:
    """A .npy upload -> ndarray, after checking its header: no object (pickled) arrays, numeric dtype, size."""
    content = content if isinstance(content, FileRange) else FileRange(content, name=name)
    if not content.size:
        raise InputError(400, f"{name}: empty file")
    with content.open() as stream:
        shape, _fortran, dtype, offset = _npy_header(stream, name)
        if dtype.hasobject:
            raise InputError(422, f"{name}: object arrays need pickle to load, which this service refuses "
                                  "(allow_pickle=False): save a numeric array")
        if dtype.fields is not None or dtype.kind not in "iuf":
            raise InputError(422, f"{name}: unsupported dtype {dtype}: a slice holds integer or floating HU values")
        if len(shape) not in (2, 3):
            raise InputError(422, f"{name}: expected a 2-D slice (H, W) or a stack of slices (N, H, W), got shape "
                                  f"{shape}")
        count = math.prod(shape)
        if count == 0:
            raise InputError(422, f"{name}: empty array (shape {shape})")
        if count * dtype.itemsize != content.size - offset:
            raise InputError(422, f"{name}: truncated or padded .npy: the header declares {count * dtype.itemsize:,} "
                                  f"bytes of data, the file holds {content.size - offset:,}")
        stream.seek(0)
        try:
            array = np.load(stream, allow_pickle=False)
        except Exception as exc:  # ValueError for pickles, anything else for a corrupt file
            raise InputError(422, f"{name}: unreadable .npy ({exc})") from None
    return array


def decode_slices(uploads: list[Upload], limits: ServeLimits) -> list[SliceInput]:
    """.npy uploads (each a 2-D slice or an (N, H, W) stack of HU) -> checked 2-D float32 slices."""
    slices: list[SliceInput] = []
    for upload in uploads:
        array = read_npy(upload.content, upload.filename, limits)
        stack = array[None] if array.ndim == 2 else array
        if len(slices) + len(stack) > limits.max_slices:
            raise InputError(413, f"more than {limits.max_slices} slices in one request")
        height, width = stack.shape[1:]
        if max(height, width) > limits.max_slice_side or min(height, width) < limits.min_slice_side:
            raise InputError(422, f"{upload.filename}: slice size {height}x{width} is outside "
                                  f"{limits.min_slice_side}..{limits.max_slice_side} pixels per side")
        values = stack.astype(np.float32)
        if not np.isfinite(values).all():
            raise InputError(422, f"{upload.filename}: contains NaN or infinite values")
        for index, hu in enumerate(values):
            notes = []
            low, high = float(hu.min()), float(hu.max())
            if low == high:
                notes.append("blank (constant) slice")
            elif low >= 0.0 and high <= 1.0:
                notes.append("values lie in [0, 1]: they look normalised, not Hounsfield units")
            name = upload.filename if array.ndim == 2 else f"{upload.filename}[{index}]"
            slices.append(SliceInput(name, hu, notes))
    if not slices:
        raise InputError(400, "no slices in the request")
    return slices
