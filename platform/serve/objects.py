"""Volumes the service reads from object storage by URI (`POST /v1/predict/object`).

Why: a large upload through Serve's HTTP proxy is held again by Serve itself (its proxy queues the request's
messages and the ingress replica fetches them as fast as they come, however fast the handler reads: about 0.6x of
a 280 MiB body, `benchmarks/serve_memory.py`). A client that writes the volume to a bucket and posts its URI sends
a few hundred bytes instead, and the ingress streams the object into the same spooled body an upload goes to (its
disk budget, its deletion when the request ends), so the service's memory per request is its own reading's.

What the service may read is the operator's choice: only URIs under the prefixes it was started with
(`--object-prefixes`; none by default, and the route answers 403), only on object stores (`s3://`, `gs://`; never
`file://` or `http://`, which would let a caller read the server's files or reach other hosts), with no `.`/`..`
segments or query strings. The object's size is checked against the body cap before any of it is read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ctplatform import storage
from ctplatform.config.serve import OBJECT_SCHEMES
from ctplatform.serve.body import Body
from ctplatform.serve.inputs import InputError, ServeLimits

MAX_REQUEST_BYTES = 16 * 1024  # the JSON naming the object
OBJECT_REQUEST_TOO_LARGE = ('this route takes only JSON naming one object, {"uri": ...}; upload a volume to '
                            "/v1/predict/volume")
FETCH_CHUNK = 1 << 20  # bytes read from the store at a time (the file object's read-ahead: 4 of them)


def normalised_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """Each prefix ending in "/" (so `s3://b/in` allows `s3://b/in/x` but not `s3://b/inbox/x`)."""
    return tuple(prefix.rstrip("/") + "/" for prefix in prefixes)


def requested_uri(payload: bytes, prefixes: Sequence[str]) -> str:
    """The object URI of a request's JSON body `{"uri": "s3://..."}`, or InputError (400 malformed, 422 not an
    object URI this service could read, 403 outside the prefixes it may read)."""
    if not prefixes:
        raise InputError(403, "this service reads no object-store URIs (start it with --object-prefixes)")
    try:
        request = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(400, f"the body must be JSON: {{\"uri\": \"s3://bucket/key\"}} ({exc})") from None
    if not isinstance(request, dict) or set(request) != {"uri"} or not isinstance(request["uri"], str):
        raise InputError(400, "the body must be a JSON object with one string field, uri")
    uri = request["uri"]
    if not storage.is_uri(uri) or storage.scheme(uri) not in OBJECT_SCHEMES:
        raise InputError(422, f"{uri[:200]!r} is not an object-store URI ({', '.join(OBJECT_SCHEMES)})")
    key = uri.split("://", 1)[1]
    if any(mark in uri for mark in "?#\\") or any(part in ("", ".", "..") for part in key.split("/")):
        raise InputError(422, f"{uri[:200]!r}: an object URI has no empty, '.' or '..' parts, '?', '#' or '\\'")
    try:
        storage.user_path(uri)
    except storage.StorageError as exc:
        raise InputError(422, str(exc)) from None
    if not any(uri.startswith(prefix) for prefix in normalised_prefixes(prefixes)):
        raise InputError(403, f"{uri[:200]}: outside the prefixes this service reads")
    return uri


@dataclass(frozen=True)
class StoredObject:
    uri: str
    size: int

    @property
    def filename(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


def stat_object(uri: str, limits: ServeLimits) -> StoredObject:
    """The object at `uri` and its size, or InputError: 404 no such object, 422 not one object, 400 empty, 413 above
    the object cap, 502 the store refused the service. Blocking (one request to the store): run it in a thread."""
    fs, path = storage.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(404, f"{uri}: no such object") from None
    except PermissionError as exc:
        raise InputError(502, f"{uri}: the object store refused the service ({type(exc).__name__})") from None
    if info.get("type") != "file":
        raise InputError(422, f"{uri}: not one object (post a DICOM series as one .zip)")
    size = int(info.get("size") or 0)
    if size == 0:
        raise InputError(400, f"{uri}: the object is empty")
    if size > limits.max_object_bytes:
        raise InputError(413, f"{uri}: {size:,} bytes, above the limit of {limits.max_object_bytes:,} bytes")
    return StoredObject(uri, size)


def fetch_object(stored: StoredObject, body: Body, stop: threading.Event | None = None) -> None:
    """Stream the object into `body` and finish it. The caller has reserved its size (`body.expect(stored.size)`,
    on the event loop, where the budgets live), so appending here changes no budget; an object that is not of that
    size any more was replaced while being read (409). Blocking: run it in a thread; `stop` set ends it at the next
    chunk (the request is gone)."""
    fs, path = storage.filesystem(stored.uri)
    with fs.open(path, "rb", block_size=4 * FETCH_CHUNK, cache_type="readahead") as source:
        while chunk := source.read(FETCH_CHUNK):
            if stop is not None and stop.is_set():
                return
            if body.size + len(chunk) > stored.size:  # grown: refused before a byte beyond the reservation
                raise InputError(409, f"{stored.uri}: the object changed while it was read; retry")
            body.append(chunk)
    if body.size != stored.size:
        raise InputError(409, f"{stored.uri}: the object changed while it was read; retry")
    body.finish()
