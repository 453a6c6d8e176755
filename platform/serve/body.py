"""Reading a request body so that slow or greedy clients cannot starve others.

Three bounds, checked as the bytes arrive: the body cap (413); a deadline and a minimum average rate (408), so a
client trickling bytes loses its request after a short grace period instead of holding an ingress slot for the
whole request timeout; and a replica-wide budget on the bytes of bodies held in memory at once (503 with
Retry-After), reserved from Content-Length before any byte is read, so many large uploads at once are refused
early rather than exhausting the replica's memory. The same :class:`MemoryBudget` bounds the memory of volume
decoding (`ctplatform.serve.decode_memory` estimates each request's share from its header).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from dataclasses import dataclass

from ctplatform.serve.inputs import InputError, ServeLimits

BUSY_RETRY_AFTER_S = 1


class MemoryBudget:
    """Bytes one ingress replica holds at once for one purpose (`holding` names it in messages: request bodies,
    volume decoding). Used from the replica's event loop only."""

    def __init__(self, capacity: int, holding: str = "bytes of uploads"):
        self.capacity = capacity
        self.holding = holding
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
        if count > self.bytes:
            self.budget.reserve(count - self.bytes)
            self.bytes = count

    def release(self) -> None:
        self.budget.release(self.bytes)
        self.bytes = 0


async def read_body(chunks: AsyncIterable[bytes], limits: ServeLimits, reservation: Reservation | None = None,
                    declared_length: int | None = None) -> bytes:
    """The whole body, or InputError: 413 past the cap, 408 when the client is too slow, 503 when the replica's
    body budget is spent (reserved from `declared_length` up front, grown as a chunked body arrives)."""
    if reservation is not None and declared_length:
        reservation.grow_to(declared_length)
    loop = asyncio.get_running_loop()
    started = loop.time()
    iterator = aiter(chunks)
    parts: list[bytes] = []
    total = 0
    while True:
        # the latest moment more bytes may come: the body's deadline, or where the average rate since the grace
        # period would fall below the minimum
        due = min(limits.body_timeout_s, limits.body_grace_s + total / limits.min_body_rate)
        waited = loop.time() - started
        try:
            async with asyncio.timeout(max(0.0, due - waited)):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            break
        except TimeoutError:
            waited = loop.time() - started
            raise InputError(408, f"request body too slow: {total:,} bytes in {waited:.0f} s (the service needs "
                                  f"{limits.min_body_rate / 1024:g} KiB/s after the first {limits.body_grace_s:g} "
                                  f"s, and the whole body within {limits.body_timeout_s:g} s)") from None
        total += len(chunk)
        if total > limits.max_body_bytes:
            raise InputError(413, f"request body is above the limit of {limits.max_body_bytes:,} bytes")
        if reservation is not None:
            reservation.grow_to(total)
        parts.append(chunk)
    return b"".join(parts)
