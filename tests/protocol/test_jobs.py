"""The job record's state machine, against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from protocol.connections import open_stores
from protocol.errors import BlobMissing, JobNotCancellable, UnknownJob
from protocol.jobs import JobStore, new_job_id
from protocol.keys import blob_key, job_key

EXPIRED = {"code": "expired", "message": "late", "retryable": True}


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    yield stores.jobs
    stores.text.close()


def _create(store: JobStore, **extra: str) -> str:
    job_id = new_job_id()
    fields = {"model": "fraud", "model_version": "1", "blob_ref": "b1", **extra}
    assert store.create(job_id, fields) == job_id
    return job_id


def test_a_new_job_is_queued_with_a_server_timestamp(store: JobStore) -> None:
    job_id = _create(store)
    view = store.view(job_id)
    assert view["status"] == "queued"
    assert view["model"] == "fraud" and view["model_version"] == "1"
    assert view["submitted_at"].endswith("Z") and view["started_at"] is None
    assert view["attempts"] == 0 and view["result"] is None and view["error"] is None


def test_claim_then_succeed_records_the_result_and_sets_the_result_ttl(store: JobStore, redis_url: str) -> None:
    job_id = _create(store)
    assert store.claim(job_id, EXPIRED) == "claimed"
    assert store.view(job_id)["status"] == "running"
    assert store.succeed(job_id, "b1", {"score": 0.5}) == "ok"
    view = store.view(job_id)
    assert view["status"] == "succeeded" and view["result"] == {"score": 0.5}
    assert view["attempts"] == 1 and view["finished_at"] is not None
    ttl = redis.Redis.from_url(redis_url).ttl(job_key(job_id))
    assert 0 < ttl <= 60


def test_a_finished_job_is_never_claimed_again(store: JobStore) -> None:
    job_id = _create(store)
    store.claim(job_id, EXPIRED)
    store.fail(job_id, "b1", {"code": "invalid_image", "message": "bad", "retryable": False})
    assert store.claim(job_id, EXPIRED) == "failed"
    assert store.succeed(job_id, "b1", {"x": 1}) == "failed"
    assert store.view(job_id)["error"]["code"] == "invalid_image"


def test_a_redelivered_running_job_is_claimed_again_and_counted(store: JobStore) -> None:
    job_id = _create(store)
    store.claim(job_id, EXPIRED)
    assert store.claim(job_id, EXPIRED) == "claimed"
    assert store.view(job_id)["attempts"] == 2


def test_cancel_stops_a_queued_job_and_the_worker_then_skips_it(store: JobStore) -> None:
    job_id = _create(store)
    store.cancel(job_id)
    store.cancel(job_id)  # a second cancel is a no-op
    assert store.view(job_id)["status"] == "cancelled"
    assert store.claim(job_id, EXPIRED) == "cancelled"


def test_a_running_job_cannot_be_cancelled(store: JobStore) -> None:
    job_id = _create(store)
    store.claim(job_id, EXPIRED)
    with pytest.raises(JobNotCancellable):
        store.cancel(job_id)


def test_a_job_claimed_after_its_queue_ttl_expires(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=1, result_ttl_s=60)
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "fraud", "model_version": "1", "blob_ref": "b"})
    time.sleep(1.2)
    assert stores.jobs.claim(job_id, EXPIRED) == "expired"
    view = stores.jobs.view(job_id)
    assert view["status"] == "expired" and view["error"] == EXPIRED


def test_unknown_ids_are_unknown(store: JobStore) -> None:
    with pytest.raises(UnknownJob):
        store.view("nope")
    assert store.claim("nope", EXPIRED) == "missing"


def test_an_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first, second = new_job_id(), new_job_id()
    fields = {"model": "fraud", "model_version": "1", "blob_ref": "b"}
    assert store.create(first, fields, idempotency="order-17") == first
    assert store.create(second, fields, idempotency="order-17") == first
    with pytest.raises(UnknownJob):
        store.view(second)


def test_a_blob_is_deleted_when_its_job_ends(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=30)
    blob_ref = stores.blobs.put(b"\x00\x01pixels", ttl_s=3600)
    assert stores.blobs.get(blob_ref) == b"\x00\x01pixels"
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "fraud", "model_version": "1", "blob_ref": blob_ref})
    stores.jobs.claim(job_id, EXPIRED)
    stores.jobs.succeed(job_id, blob_ref, {})
    assert not redis.Redis.from_url(redis_url).exists(blob_key(blob_ref))
    with pytest.raises(BlobMissing):
        stores.blobs.get(blob_ref)


def test_the_blob_of_a_job_that_expires_in_the_queue_is_deleted(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=1, result_ttl_s=30)
    blob_ref = stores.blobs.put(b"DICM header with a name", ttl_s=3600)
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "fraud", "model_version": "1", "blob_ref": blob_ref})
    redis.Redis.from_url(redis_url).hset(job_key(job_id), "expires_at", "0")
    assert stores.jobs.claim(job_id, EXPIRED) == "expired"
    assert not redis.Redis.from_url(redis_url).exists(blob_key(blob_ref))
