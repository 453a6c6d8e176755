"""Volumes read by URI (`POST /v1/predict/object`), without Ray: which URIs the service may read, and the fetch of
an object from a real S3-protocol server (moto, 127.0.0.1) into the same spooled body an upload goes to."""

import json
import os
import threading

import pytest

from ctplatform.serve.body import Body, MemoryBudget, Reservation, Spool
from ctplatform.serve.inputs import InputError, ServeLimits
from ctplatform.serve.objects import fetch_object, requested_uri, stat_object

pytestmark = pytest.mark.timeout(60)

PREFIXES = ("s3://scans-in/incoming", "gs://other-scans/ct/")
LIMITS = ServeLimits(max_body_bytes=2 << 20, max_object_bytes=3 << 20, spool_threshold_bytes=1 << 20,
                     max_inflight_spool_bytes=8 << 20)


def status_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.reason
    return info.value.status


def ask(uri) -> bytes:
    return json.dumps({"uri": uri}).encode()


@pytest.mark.parametrize("payload, status", [
    (ask("s3://scans-in/incoming/a/scan.nii.gz"), None),
    (ask("gs://other-scans/ct/scan.mha"), None),
    (ask("s3://scans-in/incomingx/scan.nii.gz"), 403),  # a prefix is a folder, not a string prefix
    (ask("s3://scans-in/private/scan.nii.gz"), 403),
    (ask("s3://scans-in/incoming/../private/scan.nii.gz"), 422),
    (ask("s3://scans-in/incoming/./scan.nii.gz"), 422),
    (ask("s3://scans-in/incoming//scan.nii.gz"), 422),
    (ask("s3://scans-in/incoming/scan.nii.gz?versionId=1"), 422),
    (ask("file:///etc/passwd"), 422),
    (ask("http://169.254.169.254/latest/meta-data"), 422),
    (ask("/etc/passwd"), 422),
    (ask("s3://Not_A_Bucket/incoming/x"), 422),
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (json.dumps({"uri": 3}).encode(), 400),
    (json.dumps({"uri": "s3://scans-in/incoming/x", "more": 1}).encode(), 400),
    (json.dumps(["s3://scans-in/incoming/x"]).encode(), 400),
])
def test_which_uris_the_service_reads(payload, status):
    if status is None:
        assert requested_uri(payload, PREFIXES) == json.loads(payload)["uri"]
    else:
        assert status_of(requested_uri, payload, PREFIXES) == status


def test_a_service_started_without_prefixes_reads_no_uri():
    assert status_of(requested_uri, ask("s3://scans-in/incoming/scan.nii.gz"), ()) == 403


@pytest.fixture
def spool(tmp_path):
    made = Spool(LIMITS, tmp_path / "spool")
    yield made
    made.remove()


def fetched(uri, spool, memory=None, stop=None):
    """What a request holds after the fetch: the body (closed by the caller), as the ingress does it."""
    stored = stat_object(uri, LIMITS)
    body = Body(LIMITS.spool_threshold_bytes, spool, memory)
    body.expect(stored.size)
    fetch_object(stored, body, stop)
    return stored, body


@pytest.mark.parametrize("size", [1000, (2 << 20) + 17])  # held in memory; spooled to disk
def test_an_object_is_fetched_whole_into_the_request_body(s3_bucket, spool, size):
    from ctplatform import storage

    data = os.urandom(size)
    storage.write_bytes(f"{s3_bucket}/incoming/scan.nii.gz", data)
    memory = Reservation(MemoryBudget(LIMITS.max_inflight_body_bytes))
    stored, body = fetched(f"{s3_bucket}/incoming/scan.nii.gz", spool, memory)
    with body:
        assert stored.filename == "scan.nii.gz" and stored.size == size
        assert body.content.read_bytes() == data
        spooled = list(spool.directory.iterdir())
        assert len(spooled) == (size > LIMITS.spool_threshold_bytes)
        # reserved once, from the listed size: memory for a small object, disk for a large one
        assert (memory.bytes, body.disk.bytes) == ((size, 0) if size <= LIMITS.spool_threshold_bytes else (0, size))
    assert list(spool.directory.iterdir()) == [] and spool.budget.held == 0 and memory.budget.held == 0


def test_missing_empty_oversized_and_folder_objects_are_refused_before_reading(s3_bucket, spool):
    from ctplatform import storage

    assert status_of(stat_object, f"{s3_bucket}/incoming/none.nii.gz", LIMITS) == 404
    storage.write_bytes(f"{s3_bucket}/incoming/empty.nii.gz", b"")
    assert status_of(stat_object, f"{s3_bucket}/incoming/empty.nii.gz", LIMITS) == 400
    storage.write_bytes(f"{s3_bucket}/incoming/big.nii.gz", bytes(LIMITS.max_object_bytes + 1))
    assert status_of(stat_object, f"{s3_bucket}/incoming/big.nii.gz", LIMITS) == 413
    # above the upload cap, within the object cap: an object is not an upload (Serve never carries it)
    storage.write_bytes(f"{s3_bucket}/incoming/larger.nii.gz", bytes(LIMITS.max_body_bytes + 1))
    assert stat_object(f"{s3_bucket}/incoming/larger.nii.gz", LIMITS).size == LIMITS.max_body_bytes + 1
    storage.write_bytes(f"{s3_bucket}/incoming/series/1.dcm", b"DICM")
    assert status_of(stat_object, f"{s3_bucket}/incoming/series", LIMITS) == 422


def test_an_object_replaced_while_read_is_refused_and_a_stopped_fetch_ends(s3_bucket, spool):
    from ctplatform import storage

    uri = f"{s3_bucket}/incoming/scan.nii.gz"
    storage.write_bytes(uri, bytes(2 << 20))
    stored = stat_object(uri, LIMITS)
    storage.write_bytes(uri, bytes(3 << 20))  # replaced by a larger object after its size was read
    with Body(LIMITS.spool_threshold_bytes, spool) as body:
        body.expect(stored.size)
        assert status_of(fetch_object, stored, body) == 409
        assert body.disk.bytes == stored.size  # the fetch reserved nothing beyond what the caller did
    stop = threading.Event()
    stop.set()
    with Body(LIMITS.spool_threshold_bytes, spool) as body:
        body.expect(stored.size)
        fetch_object(stat_object(uri, LIMITS), body, stop)
        assert body.content is None and body.size == 0
    assert list(spool.directory.iterdir()) == []


def test_a_store_that_refuses_the_service_is_a_502(s3_bucket, spool, monkeypatch):
    from ctplatform import storage

    storage.write_bytes(f"{s3_bucket}/incoming/scan.nii.gz", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert status_of(stat_object, f"{s3_bucket}/incoming/scan.nii.gz", LIMITS) == 502
