"""The job record's state machine, leases and fencing, against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.errors import BlobMissing, JobNotCancellable, UnknownJob
from inferq.protocol.jobs import Claim, JobStatus, JobStore, Outcome, new_job_id
from inferq.protocol.keys import (
    blob_key,
    callbacks_key,
    dead_letter_key,
    job_key,
    leases_key,
    queued_key,
    retries_key,
    urgent_waiting_key,
)


@pytest.fixture
def stores(redis_url: str) -> Iterator[Stores]:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    yield stores
    stores.text.close()


@pytest.fixture
def store(stores: Stores) -> JobStore:
    return stores.jobs


def _create(stores: Stores, *, max_attempts: int = 3, **extra: str) -> str:
    job_id = new_job_id()
    blob_ref = stores.blobs.put(b"pixels", ttl_s=3600)
    fields = {"model": "fraud", "model_version": "1", "blob_ref": blob_ref, "max_attempts": str(max_attempts), **extra}
    assert stores.jobs.create(job_id, fields) == job_id
    return job_id


def _claim(store: JobStore, job_id: str, *, lease_s: float = 30.0, node: str = "n1") -> Claim:
    return store.claim_result(store.claim(job_id, node=node, pid=1, lease_s=lease_s))


def _succeed(store: JobStore, job_id: str, token: int, result: dict[str, object] | None = None) -> str:
    [reply] = store.finish([Outcome(job_id, token, JobStatus.SUCCEEDED, result=result or {"score": 0.5})])
    return reply


def test_a_new_job_is_queued_with_a_server_timestamp(stores: Stores) -> None:
    job_id = _create(stores)
    view = stores.jobs.view(job_id)
    assert view["status"] == "queued"
    assert view["model"] == "fraud" and view["model_version"] == "1"
    assert view["submitted_at"].endswith("Z") and view["started_at"] is None
    assert view["attempts"] == 0 and view["result"] is None and view["error"] is None
    assert stores.text.zscore(queued_key(), job_id) is not None


def test_claim_then_succeed_records_the_result_drops_the_blob_and_announces_it(stores: Stores, redis_url: str) -> None:
    job_id = _create(stores)
    blob_ref = stores.jobs.fields(job_id)["blob_ref"]
    listener = redis.Redis.from_url(redis_url).pubsub()
    listener.subscribe("inferq:done")
    claim = _claim(stores.jobs, job_id)
    assert (claim.outcome, claim.token, claim.lost) == ("claimed", 1, 0)
    assert 0 <= claim.queued_s < 60
    fields = stores.jobs.fields(job_id)
    assert (claim.priority, claim.expires_at_s) == (fields.get("priority", ""), float(fields["expires_at"]))
    assert claim.tenant == fields.get("tenant", "")
    assert stores.jobs.view(job_id)["status"] == "running"
    assert stores.text.zscore(leases_key(), job_id) is not None
    assert _succeed(stores.jobs, job_id, claim.token) == "ok"
    view = stores.jobs.view(job_id)
    assert view["status"] == "succeeded" and view["result"] == {"score": 0.5}
    assert view["attempts"] == 1 and view["finished_at"] is not None
    assert 0 < redis.Redis.from_url(redis_url).ttl(job_key(job_id)) <= 60
    with pytest.raises(BlobMissing):
        stores.blobs.get(blob_ref)
    assert stores.text.zscore(leases_key(), job_id) is None
    messages = [listener.get_message(timeout=1.0) for _ in range(2)]
    assert any(m and m["data"] == job_id.encode() for m in messages)
    listener.close()


def test_a_finished_job_is_never_claimed_again(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores)
    token = _claim(store, job_id).token
    store.finish([Outcome(job_id, token, JobStatus.FAILED, error={"code": "invalid_image", "message": "bad"})])
    assert _claim(store, job_id).outcome == "failed"
    assert _succeed(store, job_id, token) == "fenced"
    assert store.view(job_id)["error"]["code"] == "invalid_image"


def test_a_live_lease_fences_off_a_second_claim(store: JobStore, stores: Stores) -> None:
    # Given a running attempt whose lease is live, a redelivered message must not start a second attempt
    job_id = _create(stores)
    first = _claim(store, job_id)
    assert _claim(store, job_id, node="n2").outcome == "leased"
    assert store.view(job_id)["attempts"] == 1
    assert _succeed(store, job_id, first.token) == "ok"


def test_after_a_lease_lapses_only_the_new_attempt_may_write(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores)
    old = _claim(store, job_id, lease_s=1)
    assert store.begin([(job_id, old.token)]) == [True]
    time.sleep(1.1)
    new = _claim(store, job_id, node="n2")
    # Its forward pass ran alone when the worker vanished: the job may be what ended it, so it runs alone again.
    assert new.claimed and new.token == 2 and new.lost == 1
    # The old attempt, still computing somewhere, can neither renew, begin nor write its result.
    assert store.renew([(job_id, old.token)], lease_s=30) == [False]
    assert store.begin([(job_id, old.token)]) == [False]
    assert _succeed(store, job_id, old.token, {"by": "old"}) == "fenced"
    assert _succeed(store, job_id, new.token, {"by": "new"}) == "ok"
    assert store.view(job_id)["result"] == {"by": "new"}


def test_renewing_keeps_a_lease_alive(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores)
    claim = _claim(store, job_id, lease_s=1)
    for _ in range(3):
        time.sleep(0.5)
        assert store.renew([(job_id, claim.token)], lease_s=1) == [True]
    assert _claim(store, job_id, node="n2").outcome == "leased"


def test_cancel_stops_a_queued_job_and_the_worker_then_skips_it(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores)
    store.cancel(job_id)
    store.cancel(job_id)  # a second cancel is a no-op
    assert store.view(job_id)["status"] == "cancelled"
    assert _claim(store, job_id).outcome == "cancelled"


def test_a_claimed_job_waiting_for_its_batch_can_be_cancelled_and_is_then_fenced(
    store: JobStore, stores: Stores
) -> None:
    job_id = _create(stores)
    claim = _claim(store, job_id)
    store.cancel(job_id)
    assert store.view(job_id)["status"] == "cancelled"
    assert store.begin([(job_id, claim.token)]) == [False]
    assert _succeed(store, job_id, claim.token) == "fenced"


def test_a_computing_job_cannot_be_cancelled(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores)
    claim = _claim(store, job_id)
    assert store.begin([(job_id, claim.token)]) == [True]
    with pytest.raises(JobNotCancellable):
        store.cancel(job_id)


def test_a_queued_job_reads_expired_after_its_deadline_with_no_worker(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "fraud", "model_version": "1", "blob_ref": "b"}, queue_s=0.5)
    time.sleep(0.7)
    view = stores.jobs.view(job_id)
    assert view["status"] == "expired" and view["error"]["code"] == "expired"
    assert stores.jobs.claim_result(stores.jobs.claim(job_id, node="n", pid=1, lease_s=5)).outcome == "expired"


def test_unknown_ids_are_unknown(store: JobStore) -> None:
    with pytest.raises(UnknownJob):
        store.view("nope")
    with pytest.raises(UnknownJob):
        store.cancel("nope")
    assert _claim(store, "nope").outcome == "missing"


def test_an_idempotency_key_returns_the_live_job_and_a_new_one_once_it_is_gone(store: JobStore, redis_url: str) -> None:
    first, second, third = new_job_id(), new_job_id(), new_job_id()
    fields = {"model": "fraud", "model_version": "1", "blob_ref": "b"}
    assert store.create(first, fields, idempotency="order-17") == first
    assert store.create(second, fields, idempotency="order-17") == first
    with pytest.raises(UnknownJob):
        store.view(second)
    # The record is gone (its TTL ran out) while the key remains: a resubmission makes a new job, never a 404.
    redis.Redis.from_url(redis_url).delete(job_key(first))
    assert store.create(third, fields, idempotency="order-17") == third
    assert store.view(third)["status"] == "queued"


def test_a_transient_failure_requeues_with_backoff_then_dead_letters(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores, max_attempts=2)
    error = {"code": "backend_unavailable", "message": "x", "retryable": True}
    token = _claim(store, job_id).token
    assert store.release(job_id, token, backoff_s=0.2, error=error) == "ok"
    assert store.view(job_id)["status"] == "queued"
    assert stores.text.zscore(retries_key(), job_id) is not None
    assert store.due(retries_key()) == []
    time.sleep(0.3)
    assert store.due(retries_key()) == [job_id]
    token = _claim(store, job_id).token
    assert token == 2
    assert store.release(job_id, token, backoff_s=0.2, error=error) == "dead"
    view = store.view(job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "backend_unavailable"
    assert store.dead_letters() == [job_id]


def test_a_lapsed_lease_is_recovered_then_poison_after_max_attempts(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores, max_attempts=2)
    blob_ref = stores.jobs.fields(job_id)["blob_ref"]
    # Each attempt's forward pass runs alone and its worker dies: the job itself is to blame.
    for expected in ("requeued", "dead"):
        claim = _claim(store, job_id, lease_s=0.2)
        assert store.begin([(job_id, claim.token)]) == [True]
        assert store.recover(job_id, backoff_s=0) == "live"
        time.sleep(0.3)
        assert store.recover(job_id, backoff_s=0) == expected
        assert store.view(job_id)["status"] == ("queued" if expected == "requeued" else "failed")
    view = store.view(job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "poison"
    assert stores.text.zscore(dead_letter_key(), job_id) is not None
    # The upload is kept for an operator to requeue the job; requeueing gives it fresh attempts.
    assert stores.blobs.get(blob_ref) == b"pixels"
    assert store.requeue_dead(job_id) == "ok"
    view = store.view(job_id)
    assert view["status"] == "queued" and view["attempts"] == 0 and view["error"] is None
    assert store.dead_letters() == []


def _die_with_worker(store: JobStore, job_id: str, *, batch_with: str | None = None) -> None:
    """Claim the job, optionally start its forward pass (beside `batch_with`), and let its worker vanish."""
    claim = _claim(store, job_id, lease_s=0.2)
    if batch_with is not None:
        other = _claim(store, batch_with, lease_s=30)
        assert store.begin([(job_id, claim.token), (batch_with, other.token)]) == [True, True]
    time.sleep(0.3)
    assert store.recover(job_id, backoff_s=0) == "requeued"


def test_a_bystander_of_a_dying_worker_is_spared_its_attempts_a_bounded_number_of_times(
    store: JobStore, stores: Stores
) -> None:
    # Given a job that only waited in worker processes that died, max_attempts deaths cost it no attempt
    job_id = _create(stores, max_attempts=2)
    for _ in range(2):
        _die_with_worker(store, job_id)
    claim = _claim(store, job_id, lease_s=0.2)
    assert claim.claimed and claim.lost == 0  # not a suspect: it batches with others as usual
    # ...but a crash loop still ends: past that, each death is charged
    time.sleep(0.3)
    assert store.recover(job_id, backoff_s=0) == "requeued"
    _claim(store, job_id, lease_s=0.2)
    time.sleep(0.3)
    assert store.recover(job_id, backoff_s=0) == "dead"
    assert store.view(job_id)["error"]["code"] == "poison"


def test_a_job_whose_shared_batch_died_is_spared_but_runs_alone_next(store: JobStore, stores: Stores) -> None:
    job_id, neighbour = _create(stores, max_attempts=1), _create(stores)
    _die_with_worker(store, job_id, batch_with=neighbour)
    claim = _claim(store, job_id)
    assert claim.claimed and claim.lost == 1  # a suspect: isolated by the batcher
    assert _succeed(store, job_id, claim.token) == "ok"


def test_a_finished_job_with_a_callback_owes_one(store: JobStore, stores: Stores) -> None:
    job_id = _create(stores, callback_url="https://example.org/hook")
    token = _claim(store, job_id).token
    assert _succeed(store, job_id, token) == "ok:callback"
    assert stores.text.zscore(callbacks_key(), job_id) is not None
    assert store.view(job_id)["callback"]["state"] == "pending"
    assert store.take_callback(job_id, in_flight_s=60)
    assert store.callback_done(job_id, "delivered", "HTTP 204") == "delivered"
    callback = store.view(job_id)["callback"]
    assert callback["state"] == "delivered" and callback["attempts"] == 1 and callback["last"] == "HTTP 204"
    assert stores.text.zscore(callbacks_key(), job_id) is None


def test_blobs_round_trip(stores: Stores) -> None:
    blob_ref = stores.blobs.put(b"\x00\x01pixels", ttl_s=3600)
    assert stores.blobs.get(blob_ref) == b"\x00\x01pixels"
    stores.blobs.delete(blob_ref)
    with pytest.raises(BlobMissing):
        stores.blobs.get(blob_ref)
    assert not stores.text.exists(blob_key(blob_ref))


def test_pipelined_scripts_run_after_redis_forgot_them(store: JobStore, stores: Stores) -> None:
    # Given scripts sent by hash in a pipeline, when Redis lost its script cache (a restart), they still run once
    job_id = _create(stores)
    stores.text.script_flush()
    pipe = stores.text.pipeline(transaction=False)
    store.claim(job_id, node="n1", pid=1, lease_s=30, client=pipe)
    pipe.exists(job_key(job_id))
    reply, exists = store.execute(pipe)
    assert store.claim_result(reply).token == 1 and exists == 1
    assert store.view(job_id)["status"] == "running" and store.view(job_id)["attempts"] == 1


def test_waiting_stat_and_urgent_jobs_are_visible_to_a_less_urgent_batch_until_claimed(stores: Stores) -> None:
    model = f"m-{new_job_id()[:8]}"
    routine = _create(stores, model=model, priority="routine")
    assert not stores.jobs.more_urgent_waiting(model, 2)  # a routine job is nothing to wait for
    urgent = _create(stores, model=model, priority="urgent")
    stat = _create(stores, model=model, priority="stat")
    assert stores.jobs.more_urgent_waiting(model, 2) and stores.jobs.more_urgent_waiting(model, 1)
    assert not stores.jobs.more_urgent_waiting(model, 0)  # nothing outranks stat
    _claim(stores.jobs, stat)
    assert stores.jobs.more_urgent_waiting(model, 2) and not stores.jobs.more_urgent_waiting(model, 1)
    stores.jobs.cancel(urgent)
    assert not stores.jobs.more_urgent_waiting(model, 2)
    del routine


def test_a_claim_carries_the_clients_own_deadline_only(stores: Stores) -> None:
    own = _create(stores, deadline_s="30")
    default = _create(stores)
    own_claim, default_claim = _claim(stores.jobs, own), _claim(stores.jobs, default)
    assert own_claim.deadline_at_s == own_claim.expires_at_s < float("inf")
    assert default_claim.deadline_at_s == float("inf") and default_claim.expires_at_s < float("inf")


def test_an_urgent_job_gone_expired_or_backing_off_is_nothing_to_wait_for(stores: Stores) -> None:
    model = f"m-{new_job_id()[:8]}"
    # A STAT job whose record vanished (its keep time ran out before anything finalised it) is forgotten
    ghost = _create(stores, model=model, priority="stat")
    stores.text.delete(job_key(ghost))
    assert not stores.jobs.more_urgent_waiting(model, 2)
    assert stores.text.zscore(urgent_waiting_key(model), ghost) is None
    # One past its queue deadline, not yet expired by the reconciler, is not waited for
    late = new_job_id()
    stores.jobs.create(late, {"model": model, "model_version": "1", "blob_ref": "b", "priority": "stat"}, queue_s=0.2)
    assert stores.jobs.more_urgent_waiting(model, 2)
    time.sleep(0.3)
    assert not stores.jobs.more_urgent_waiting(model, 2)
    # Nor one backing off before its retry
    retrying = _create(stores, model=model, priority="urgent")
    claim = _claim(stores.jobs, retrying)
    assert stores.jobs.release(retrying, claim.token, backoff_s=30, error={"code": "x"}) == "ok"
    assert stores.jobs.view(retrying)["status"] == "queued"
    assert not stores.jobs.more_urgent_waiting(model, 2)


def test_a_job_whose_pass_ended_before_its_process_died_is_spared(store: JobStore, stores: Stores) -> None:
    # Given a job computed alone whose process began another pass before the job was recorded
    job_id, next_id = _create(stores, max_attempts=1), _create(stores)
    claim = _claim(store, job_id, lease_s=0.2)
    assert store.begin([(job_id, claim.token)]) == [True]
    assert store.begin([(next_id, _claim(store, next_id, lease_s=0.2).token)]) == [True]
    # When that process dies, the death is the later pass's: the first job is spared, the second is charged
    time.sleep(0.3)
    assert store.recover(job_id, backoff_s=0) == "requeued"
    assert store.recover(next_id, backoff_s=0) == "requeued"
    claim = _claim(store, job_id)
    assert claim.claimed and claim.lost == 0
    assert _claim(store, next_id).lost == 1
