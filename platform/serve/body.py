"""Reading a request body so that slow or greedy clients cannot starve others, and large ones do not sit in memory.

Three bounds, checked as the bytes arrive: the body cap (413); a deadline and a minimum average rate (408), so a
client trickling bytes loses its request after a short grace period instead of holding an ingress slot for the
whole request timeout; and replica-wide budgets on the bodies in flight (503 with Retry-After), reserved from
Content-Length before any byte is read, so many large uploads at once are refused early.

A body up to `ServeLimits.spool_threshold_bytes` is held in memory; a larger one is written to a temporary file as
it arrives (:class:`Spool`: a private directory per ingress replica) and deleted when the request ends, whatever
ended it (answer, refusal, a client that went away). Either way the readers get a
:class:`~ctplatform.data.readers.file_range.FileRange` of it, and a multipart file part is a window of that range,
so an upload of hundreds of MB is never loaded whole. The memory budget counts only the bodies held in memory; the
spool's own budget (`max_inflight_spool_bytes`) bounds the disk the bodies in flight take. The same
:class:`MemoryBudget` bounds the memory of volume decoding (`ctplatform.data.decode_memory` estimates each
request's share from its header).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

from ctplatform.data.readers.file_range import FileRange
from ctplatform.serve.inputs import UPLOAD_TOO_LARGE, InputError, ServeLimits, body_too_large

BUSY_RETRY_AFTER_S = 1


class MemoryBudget:
    """Bytes one ingress replica holds at once for one purpose (`holding` names it in messages: request bodies,
    volume decoding), and optionally at most `per_request` of them for one request (413 beyond, its message ending
    with `per_request_hint`). Used from the replica's event loop only."""

    def __init__(self, capacity: int, holding: str = "bytes of uploads", per_request: int | None = None,
                 per_request_hint: str = ""):
        self.capacity = capacity
        self.holding = holding
        self.per_request = per_request
        self.per_request_hint = per_request_hint
        self.held = 0

    def reserve(self, count: int) -> None:
        if count > self.capacity:  # would never fit, however long the client waited: not a 503
            raise InputError(413, f"this request needs {count:,} {self.holding}, above the service's limit of "
                                  f"{self.capacity:,}")
        if self.held + count > self.capacity:
            raise InputError(503, f"the service holds its limit of {self.capacity:,} {self.holding} in memory: "
                                  "retry in a moment")
        self.held += count

    def release(self, count: int) -> None:
        self.held -= count


@dataclass
class Reservation:
    """What one request has reserved in a budget; a context manager that releases it when the request ends,
    whatever happened."""

    budget: MemoryBudget
    bytes: int = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def grow_to(self, count: int) -> None:
        limit = self.budget.per_request
        if limit is not None and count > limit:
            raise InputError(413, f"this request needs {count:,} {self.budget.holding}, above the service's limit of "
                                  f"{limit:,} per request{self.budget.per_request_hint}")
        if count > self.bytes:
            self.budget.reserve(count - self.bytes)
            self.bytes = count

    def release(self) -> None:
        self.budget.release(self.bytes)
        self.bytes = 0


SPOOL_PREFIX = "ctplatform-uploads-"


class Spool:
    """Where one ingress replica writes request bodies above the spool threshold: a private directory (mode 0700)
    made inside `parent` (default: the system's temporary directory; it should be node-local disk, not a RAM-backed
    tmpfs, or the spooled bytes take memory again), and the budget of bytes spooled at once.

    The directory is named after the replica's process id. A replica that crashed could not delete its own, so a
    new one deletes the spool directories of this user's processes that no longer run (on the same node: the
    replacement Serve starts)."""

    def __init__(self, limits: ServeLimits, parent: str | os.PathLike | None = None):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        remove_orphaned_spools(Path(parent) if parent is not None else Path(tempfile.gettempdir()))
        self.directory = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=parent))
        self.budget = MemoryBudget(limits.max_inflight_spool_bytes, "bytes of uploads spooled to disk")

    def remove(self) -> None:
        """Delete the directory and whatever is left in it (the replica is shutting down)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_orphaned_spools(parent: Path) -> list[Path]:
    """Delete the spool directories in `parent` that this user's dead processes left; returns those deleted."""
    removed = []
    for folder in parent.glob(f"{SPOOL_PREFIX}*-*"):
        pid = folder.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        try:
            owned = folder.is_dir() and folder.stat().st_uid == os.getuid()
        except OSError:  # removed meanwhile by another replica starting
            continue
        if owned and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


class Body:
    """A request body as it arrives: in memory up to `threshold` bytes, beyond that in a file of `spool` (the bytes
    held so far are moved there). A context manager: on exit its reservations are given back and its file deleted.
    `content` is the whole body as a FileRange, once it is complete."""

    def __init__(self, threshold: int, spool: Spool | None = None, memory: Reservation | None = None):
        self.threshold, self.spool, self.memory = threshold, spool, memory
        self.disk = Reservation(spool.budget) if spool is not None else None
        self.chunks: list[bytes] = []
        self.size = 0
        self.path: Path | None = None
        self.file = None
        self.content: FileRange | None = None

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def expect(self, declared: int | None) -> None:
        """Reserve for a declared Content-Length up front: disk for a body that will be spooled, else memory."""
        if not declared:
            return
        if declared > self.threshold and self.spool is not None:
            self._spill()
            self.disk.grow_to(declared)
        elif self.memory is not None:
            self.memory.grow_to(declared)

    def append(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None and self.size > self.threshold and self.spool is not None:
            self._spill()
        if self.file is not None:
            self.disk.grow_to(self.size)
            self.file.write(chunk)
        else:
            if self.memory is not None:
                self.memory.grow_to(self.size)
            self.chunks.append(chunk)

    def finish(self) -> FileRange:
        """The complete body as a FileRange (its file closed for writing)."""
        if self.file is not None:
            self.file.close()
            self.content = FileRange(self.path, 0, self.size, name="<request body>")
        else:
            self.content = FileRange(b"".join(self.chunks), name="<request body>")
            self.chunks = []
        return self.content

    def _spill(self) -> None:
        """Move to a file in the spool: what was held in memory is written there, its memory given back."""
        if self.file is not None:
            return
        handle, name = tempfile.mkstemp(prefix="body-", dir=self.spool.directory)
        self.path = Path(name)
        self.file = os.fdopen(handle, "wb")
        self.disk.grow_to(self.size)
        for chunk in self.chunks:
            self.file.write(chunk)
        self.chunks = []
        if self.memory is not None:
            self.memory.release()

    def close(self) -> None:
        self.chunks, self.content = [], None
        if self.file is not None:
            self.file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)  # a decode still reading it keeps its open handle until done
            self.path = None
        if self.disk is not None:
            self.disk.release()
        if self.memory is not None:
            self.memory.release()


async def read_body(chunks: AsyncIterable[bytes], limits: ServeLimits, reservation: Reservation | None = None,
                    declared_length: int | None = None, spool: Spool | None = None,
                    too_large: str = UPLOAD_TOO_LARGE) -> Body:
    """The whole body, or InputError: 413 past the cap (its reason ending with `too_large`), 408 when the client is
    too slow, 503 when the replica's
    body budgets are spent (reserved from `declared_length` up front, grown as a chunked body arrives). A body above
    `limits.spool_threshold_bytes` goes to a file of `spool` (without a spool, every body is held in memory). The
    caller closes the Body returned (`with`); on any error it is closed here."""
    body = Body(limits.spool_threshold_bytes, spool, reservation)
    try:
        body.expect(declared_length)
        await _receive(chunks, limits, body, too_large)
        body.finish()
    except BaseException:
        body.close()
        raise
    return body


async def _receive(chunks: AsyncIterable[bytes], limits: ServeLimits, body: Body, too_large: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    iterator = aiter(chunks)
    while True:
        # the latest moment more bytes may come: the body's deadline, or where the average rate since the grace
        # period would fall below the minimum
        due = min(limits.body_timeout_s, limits.body_grace_s + body.size / limits.min_body_rate)
        waited = loop.time() - started
        try:
            async with asyncio.timeout(max(0.0, due - waited)):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            waited = loop.time() - started
            raise InputError(408, f"request body too slow: {body.size:,} bytes in {waited:.0f} s (the service "
                                  f"needs {limits.min_body_rate / 1024:g} KiB/s after the first "
                                  f"{limits.body_grace_s:g} s, and the whole body within {limits.body_timeout_s:g} "
                                  "s)") from None
        if body.size + len(chunk) > limits.max_body_bytes:
            raise body_too_large("request body", limits, too_large)
        body.append(chunk)
