"""Reading request bodies, without Ray: the size cap, the minimum rate and the deadline (408), and the replica's
budget of body bytes held at once (503)."""

import asyncio
import dataclasses
import os
import time

import pytest

from ctplatform.serve.body import MemoryBudget, Reservation, Spool, read_body
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
    check_content_length,
)

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_voxels=64 * 64 * 64, max_decompressed_bytes=64 * 64 * 64 * 2,
                     max_files=4, max_slices=8)


def received(reading) -> bytes:
    """The bytes of the body `reading` (a read_body coroutine) returns."""
    return asyncio.run(reading).content.read_bytes()


def status_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.reason
    return info.value.status, info.value.reason


# ----------------------------------------------------------------------------------------------- body and multipart
def test_content_length_cap_is_checked_before_reading():
    assert check_content_length({"content-length": str(LIMITS.max_body_bytes)}, LIMITS) == LIMITS.max_body_bytes
    assert check_content_length({}, LIMITS) is None
    status, reason = status_of(check_content_length, {"content-length": str(LIMITS.max_body_bytes + 1)}, LIMITS)
    assert status == 413 and "POST /v1/predict/object" in reason, reason  # where a larger volume goes
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
    assert "POST /v1/predict/object" in info.value.reason

    async def small():
        yield b"ab"
        yield b"cd"

    assert received(read_body(small(), LIMITS)) == b"abcd"


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
    assert received(read_body(trickle([b"a" * 600], 0), LIMITS, first, declared_length=600)) == b"a" * 600
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
    assert received(read_body(trickle([b"d" * 900], 0), LIMITS, Reservation(budget), 900)) == b"d" * 900




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


def test_a_per_request_decode_limit_refuses_one_volume_with_413_and_its_hint_whatever_the_budget_holds():
    decodes = MemoryBudget(100, "bytes of volume decoding", per_request=40, per_request_hint="; raise it")
    with Reservation(decodes) as first:
        first.grow_to(40)  # at the limit: taken
        with pytest.raises(InputError) as refused, Reservation(decodes) as second:
            second.grow_to(41)  # the budget has 60 free, but one request may not hold 41
        assert refused.value.status == 413, refused.value.reason
        assert refused.value.reason == ("this request needs 41 bytes of volume decoding, above the service's limit of "
                                        "40 per request; raise it")
        with pytest.raises(InputError), Reservation(decodes) as growing:
            growing.grow_to(30)
            growing.grow_to(45)  # a reservation that grows past the limit is refused too, and gives back its 30
        assert decodes.held == 40
    assert decodes.held == 0


def test_serve_limits_refuse_a_decode_budget_below_one_request_s_decode():
    with pytest.raises(ValueError, match="decode budget"):
        ServeLimits(max_request_decode_bytes=300 << 20, max_inflight_decode_bytes=200 << 20)
    ServeLimits(max_request_decode_bytes=200 << 20, max_inflight_decode_bytes=200 << 20)
    with pytest.raises(ValueError, match="spool budget"):
        ServeLimits(max_body_bytes=100 << 20, max_inflight_spool_bytes=50 << 20)


# ----------------------------------------------------------------------------------------------- spooling to disk
SPOOLED = dataclasses.replace(LIMITS, spool_threshold_bytes=1000, max_inflight_body_bytes=4000,
                              max_inflight_spool_bytes=LIMITS.max_body_bytes)


def spool_files(spool):
    return sorted(p.name for p in spool.directory.iterdir())


def test_a_body_above_the_threshold_is_spooled_to_a_private_file_deleted_when_closed(tmp_path):
    spool = Spool(SPOOLED, tmp_path / "spool")
    assert spool.directory.parent == tmp_path / "spool" and spool.directory.stat().st_mode & 0o777 == 0o700
    memory = MemoryBudget(SPOOLED.max_inflight_body_bytes)
    pieces = [bytes([k]) * 300 for k in range(7)]  # 2,100 bytes: in memory for 3 chunks, then moved to a file
    with Reservation(memory) as reservation:
        with asyncio.run(read_body(trickle(pieces, 0), SPOOLED, reservation, spool=spool)) as body:
            assert body.path is not None and spool_files(spool) == [body.path.name]
            assert body.content.read_bytes() == b"".join(pieces) and body.content.size == 2100
            assert memory.held == 0 and spool.budget.held == 2100  # on disk only: nothing counted in memory
        assert spool_files(spool) == [] and spool.budget.held == 0
        # a body at the threshold stays in memory, counted there
        with asyncio.run(read_body(trickle([b"m" * 1000], 0), SPOOLED, reservation, spool=spool)) as body:
            assert body.path is None and spool_files(spool) == [] and memory.held == 1000
            assert body.content.read_bytes() == b"m" * 1000
    assert memory.held == 0
    spool.remove()
    assert not spool.directory.exists()


def test_a_spooled_body_s_file_is_deleted_on_413_408_and_cancellation(tmp_path):
    spool = Spool(SPOOLED, tmp_path)

    async def too_big():
        for _ in range(100):
            yield b"x" * (256 * 1024)

    assert timed_status(read_body(too_big(), SPOOLED, spool=spool))[0] == 413
    assert spool_files(spool) == [] and spool.budget.held == 0
    slow = dataclasses.replace(SPOOLED, body_grace_s=0.3, min_body_rate=1e6)
    assert timed_status(read_body(trickle([b"y" * 2000, b"y"], 1.0), slow, spool=spool))[0] == 408
    assert spool_files(spool) == []

    async def cancelled_mid_body():
        seen = []

        async def chunks():
            yield b"z" * 5000
            seen.append(spool_files(spool))
            await asyncio.sleep(30)  # a client that stalls, then goes away: the request is cancelled
            yield b"z"

        task = asyncio.create_task(read_body(chunks(), SPOOLED, spool=spool))
        while not seen:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen[0]

    assert len(asyncio.run(cancelled_mid_body())) == 1  # the file existed while the body arrived
    assert spool_files(spool) == [] and spool.budget.held == 0


def test_the_spool_budget_refuses_from_content_length_with_503():
    limits = dataclasses.replace(SPOOLED, max_inflight_spool_bytes=LIMITS.max_body_bytes)
    spool = Spool(limits)
    try:
        first = asyncio.run(read_body(trickle([b"a" * 600_000], 0), limits, declared_length=600_000, spool=spool))
        with first:
            status, _, reason = timed_status(read_body(trickle([b"b"], 0), limits, declared_length=600_000,
                                                       spool=spool))
            assert status == 503 and "spooled to disk" in reason
            assert spool.budget.held == 600_000 and len(spool_files(spool)) == 1
        assert spool.budget.held == 0 and spool_files(spool) == []
    finally:
        spool.remove()


def test_a_new_spool_deletes_what_crashed_replicas_left_and_nothing_else(tmp_path):
    """A replica killed mid-upload leaves its spool directory; the next one on the node deletes it, not the
    directories of replicas that still run."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"ctplatform-uploads-{dead.pid}-abc123"
    orphan.mkdir()
    (orphan / "body-xyz").write_bytes(b"half an upload")
    running = Spool(LIMITS, tmp_path)  # this process: still running
    unrelated = tmp_path / "ctplatform-uploads-notapid-x"
    unrelated.mkdir()
    replacement = Spool(LIMITS, tmp_path)
    assert not orphan.exists()
    assert running.directory.is_dir() and unrelated.is_dir() and replacement.directory.is_dir()
    assert running.directory.name.startswith(f"ctplatform-uploads-{os.getpid()}-")
    running.remove()
    replacement.remove()
