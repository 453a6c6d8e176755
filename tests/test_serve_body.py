"""Reading request bodies, without Ray: the size cap, the minimum rate and the deadline (408), and the replica's
budget of body bytes held at once (503)."""

import asyncio
import dataclasses
import time

import pytest

from ctplatform.serve.body import MemoryBudget, Reservation, read_body
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
    check_content_length,
)

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_voxels=64 * 64 * 64, max_decompressed_bytes=64 * 64 * 64 * 2,
                     max_files=4, max_slices=8)


def status_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.reason
    return info.value.status, info.value.reason


# ----------------------------------------------------------------------------------------------- body and multipart
def test_content_length_cap_is_checked_before_reading():
    assert check_content_length({"content-length": str(LIMITS.max_body_bytes)}, LIMITS) == LIMITS.max_body_bytes
    assert check_content_length({}, LIMITS) is None
    assert status_of(check_content_length, {"content-length": str(LIMITS.max_body_bytes + 1)}, LIMITS)[0] == 413
    assert status_of(check_content_length, {"content-length": "lots"}, LIMITS)[0] == 400


def test_streamed_body_stops_at_the_cap():
    pulled = []

    async def chunks():
        for _ in range(100):
            pulled.append(1)
            yield b"x" * (256 * 1024)

    with pytest.raises(InputError) as info:
        asyncio.run(read_body(chunks(), LIMITS))
    assert info.value.status == 413 and len(pulled) == 5  # 1 MiB cap: the 5th chunk passes it; nothing more is read

    async def small():
        yield b"ab"
        yield b"cd"

    assert asyncio.run(read_body(small(), LIMITS)) == b"abcd"


def trickle(pieces, pause_s):
    async def chunks():
        for piece in pieces:
            yield piece
            await asyncio.sleep(pause_s)
    return chunks()


def timed_status(coroutine):
    started = time.perf_counter()
    try:
        asyncio.run(coroutine)
    except InputError as exc:
        return exc.status, time.perf_counter() - started, exc.reason
    return 200, time.perf_counter() - started, ""


def test_a_client_below_the_minimum_rate_gets_408_after_the_grace_period():
    limits = dataclasses.replace(LIMITS, body_grace_s=0.5, min_body_rate=64 * 1024, body_timeout_s=30)
    status, took, reason = timed_status(read_body(trickle([b"x"] * 100, 0.2), limits))  # 5 bytes/s
    assert status == 408 and 0.5 <= took < 10 and "too slow" in reason, (status, took, reason)
    # a client that sends nothing at all is let go just as soon
    status, took, _ = timed_status(read_body(trickle([b"", b"x"], 60), limits))
    assert status == 408 and took < 10
    # above the rate, pauses and all, a body is read whole
    status, took, _ = timed_status(read_body(trickle([b"y" * 65536] * 6, 0.3), limits))
    assert status == 200


def test_a_body_that_never_ends_gets_408_at_the_body_timeout():
    limits = dataclasses.replace(LIMITS, body_grace_s=0.2, min_body_rate=1024, body_timeout_s=1.5,
                                 max_body_bytes=1 << 30, max_inflight_body_bytes=1 << 30)
    status, took, reason = timed_status(read_body(trickle([b"z" * 65536] * 1000, 0.05), limits))
    assert status == 408 and 1.5 <= took < 10 and "within 1.5 s" in reason


def test_the_body_budget_refuses_with_503_before_reading_and_is_given_back():
    budget = MemoryBudget(1000)
    first = Reservation(budget)
    assert asyncio.run(read_body(trickle([b"a" * 600], 0), LIMITS, first, declared_length=600)) == b"a" * 600
    pulled = []

    async def chunks():
        pulled.append(1)
        yield b"b" * 500

    with pytest.raises(InputError) as refused:  # 600 + 500 > 1000: refused from Content-Length, nothing read
        asyncio.run(read_body(chunks(), LIMITS, Reservation(budget), declared_length=500))
    assert refused.value.status == 503 and pulled == [] and budget.held == 600
    # no Content-Length: the reservation grows as the bytes arrive; as a context manager it is given back however
    # the request ends
    with pytest.raises(InputError, match="bytes of uploads in memory"), Reservation(budget) as chunked:
        asyncio.run(read_body(trickle([b"c" * 300, b"c" * 300], 0), LIMITS, chunked))
    assert budget.held == 600
    first.release()
    assert budget.held == 0
    assert asyncio.run(read_body(trickle([b"d" * 900], 0), LIMITS, Reservation(budget), 900)) == b"d" * 900




def test_one_budget_mechanism_bounds_decoding_too_with_413_for_what_could_never_fit():
    decodes = MemoryBudget(100, "bytes of volume decoding")
    with Reservation(decodes) as first:
        first.grow_to(60)
        with pytest.raises(InputError) as busy, Reservation(decodes) as second:
            second.grow_to(50)
        assert busy.value.status == 503 and "100 bytes of volume decoding in memory" in busy.value.reason
        with pytest.raises(InputError) as never, Reservation(decodes) as huge:
            huge.grow_to(101)  # more than the whole budget: waiting would not help
        assert never.value.status == 413 and "needs 101 bytes of volume decoding" in never.value.reason
        assert decodes.held == 60
    assert decodes.held == 0


def test_serve_limits_refuse_a_decode_budget_below_one_volume_read_whole():
    with pytest.raises(ValueError, match="decode budget"):
        ServeLimits(max_decompressed_bytes=100 << 20, max_inflight_decode_bytes=150 << 20)
