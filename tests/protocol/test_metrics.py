"""The cluster-wide counters the Lua scripts keep for /metrics and `inferq status`, against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.jobs import JobStatus, Outcome, new_job_id
from inferq.protocol.metrics import read_counts, recent_failures


@pytest.fixture
def stores(redis_url: str) -> Iterator[Stores]:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    yield stores
    stores.text.close()


def _create(stores: Stores, model: str = "fraud") -> str:
    job_id = new_job_id()
    fields = {"model": model, "model_version": "1", "blob_ref": stores.blobs.put(b"x", ttl_s=60), "max_attempts": "3"}
    stores.jobs.create(job_id, fields)
    return job_id


def _claim_token(stores: Stores, job_id: str) -> int:
    return stores.jobs.claim_result(stores.jobs.claim(job_id, node="n", pid=1, lease_s=30)).token


def test_final_states_are_counted_by_model_status_and_code(stores: Stores) -> None:
    ok, bad, cancelled = _create(stores), _create(stores), _create(stores, "chest-xray")
    stores.jobs.finish([Outcome(ok, _claim_token(stores, ok), JobStatus.SUCCEEDED, result={"p": 1})])
    error = {"code": "invalid_input", "message": "m", "retryable": False}
    stores.jobs.finish([Outcome(bad, _claim_token(stores, bad), JobStatus.FAILED, error=error)])
    stores.jobs.cancel(cancelled)
    assert read_counts(stores.text, "finished") == {
        ("fraud", "succeeded", ""): 1,
        ("fraud", "failed", "invalid_input"): 1,
        ("chest-xray", "cancelled", "cancelled"): 1,
    }
    assert recent_failures(stores.text, minutes=5, now_s=stores.jobs.server_time_s()) == {"fraud": 1}
    assert read_counts(stores.text, "claims") == {("fraud",): 2}


def test_a_second_attempt_is_a_redelivery_and_a_lapsed_lease_a_recovery(stores: Stores) -> None:
    job_id = _create(stores)
    first = stores.jobs.claim_result(stores.jobs.claim(job_id, node="n", pid=1, lease_s=0.05))
    assert first.claimed and first.queued_s >= 0
    assert read_counts(stores.text, "redeliveries") == {}
    time.sleep(0.1)
    assert stores.jobs.recover(job_id, backoff_s=0) == "requeued"
    assert read_counts(stores.text, "recoveries") == {("fraud", "requeued"): 1}
    assert _claim_token(stores, job_id) == 2
    assert read_counts(stores.text, "redeliveries") == {("fraud",): 1}


def test_callback_outcomes_are_counted(stores: Stores) -> None:
    job_id = _create(stores)
    stores.jobs.callback_done(job_id, "retry", "HTTP 500", retry_in_s=1)
    stores.jobs.callback_done(job_id, "delivered", "HTTP 200")
    assert read_counts(stores.text, "callbacks") == {("retry",): 1, ("delivered",): 1}
