"""What waiting, bulk submission and outages need from the job store: a PUBLISH on every final transition, many
jobs in one pipeline, many reads in one, idempotency that never answers with a vanished job, and unsent jobs
removed. Against a real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.jobs import QUEUE_FULL, JobStatus, NewJob, Outcome, new_job_id
from inferq.protocol.keys import blob_key, done_channel, idempotency_key, job_key


@pytest.fixture
def stores(redis_url: str) -> Iterator[Stores]:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    yield stores
    stores.text.close()


def _fields(blob_ref: str = "b1") -> dict[str, str]:
    return {"model": "fraud", "model_version": "1", "blob_ref": blob_ref}


def _published(pubsub: redis.client.PubSub, count: int) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            seen.append(message["data"])
    return seen


def test_every_final_transition_publishes_the_job_id(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    pubsub = stores.text.pubsub()
    pubsub.subscribe(done_channel())
    succeeded, failed, cancelled, expired, running = (new_job_id() for _ in range(5))
    for job_id in (succeeded, failed, cancelled, running):
        stores.jobs.create(job_id, _fields())
    stores.jobs.create(expired, _fields(), queue_s=0.5)
    tokens = {
        job_id: stores.jobs.claim_result(stores.jobs.claim(job_id, node="n", pid=1, lease_s=30)).token
        for job_id in (succeeded, failed, running)
    }
    stores.jobs.finish([Outcome(succeeded, tokens[succeeded], JobStatus.SUCCEEDED, result={"x": 1})])
    error = {"code": "invalid_image", "message": "bad", "retryable": False}
    stores.jobs.finish([Outcome(failed, tokens[failed], JobStatus.FAILED, error=error)])
    stores.jobs.cancel(cancelled)
    time.sleep(0.7)
    assert stores.jobs.claim_result(stores.jobs.claim(expired, node="n", pid=1, lease_s=30)).outcome == "expired"
    # A job that merely started, or a transition refused by the state machine, publishes nothing.
    assert stores.jobs.finish([Outcome(cancelled, 1, JobStatus.SUCCEEDED, result={})]) == ["fenced"]
    assert _published(pubsub, 5) == [succeeded, failed, cancelled, expired]
    pubsub.close()
    stores.text.close()


def test_create_many_stores_blobs_and_records_with_one_id_each(stores: Stores) -> None:
    jobs = [NewJob(job_id=new_job_id(), fields=_fields(f"blob{i}"), blob=f"data{i}".encode()) for i in range(3)]
    assert stores.jobs.create_many(jobs, blob_ttl_s=100) == [j.job_id for j in jobs]
    for i, job in enumerate(jobs):
        assert stores.jobs.view(job.job_id)["status"] == "queued"
        assert stores.blobs.get(f"blob{i}") == f"data{i}".encode()
    assert 0 < stores.text.ttl(blob_key("blob0")) <= 100


def test_create_many_replays_a_used_idempotency_key_and_drops_the_spare_blob(stores: Stores) -> None:
    first = new_job_id()
    stores.jobs.create(first, _fields("original"), idempotency="tx-1")
    jobs = [
        NewJob(job_id=new_job_id(), fields=_fields("spare"), idempotency="tx-1", blob=b"again"),
        NewJob(job_id=new_job_id(), fields=_fields("other"), idempotency="tx-2", blob=b"new"),
    ]
    stored = stores.jobs.create_many(jobs, blob_ttl_s=100)
    assert stored == [first, jobs[1].job_id]
    assert not stores.text.exists(blob_key("spare"))
    assert stores.text.exists(blob_key("other"))


def test_views_reads_many_jobs_at_once_and_marks_unknown_ones(stores: Stores) -> None:
    a, b = new_job_id(), new_job_id()
    stores.jobs.create(a, _fields())
    stores.jobs.create(b, _fields())
    stores.jobs.cancel(b)
    views = stores.jobs.views([a, "missing", b])
    assert views[0] is not None and views[0]["status"] == "queued"
    assert views[1] is None
    assert views[2] is not None and views[2]["status"] == "cancelled"
    assert stores.jobs.views([]) == []


def test_an_idempotency_key_whose_job_is_gone_makes_a_new_job(stores: Stores) -> None:
    first, second = new_job_id(), new_job_id()
    assert stores.jobs.create(first, _fields(), idempotency="order-9") == first
    stores.text.delete(job_key(first))  # the record expired before the key did
    assert stores.jobs.create(second, _fields(), idempotency="order-9") == second
    assert stores.jobs.view(second)["status"] == "queued"
    assert stores.text.get(idempotency_key("fraud", "order-9")) == second


def test_discard_unsent_removes_record_key_and_blob_so_a_retry_is_a_fresh_job(stores: Stores) -> None:
    job_id = new_job_id()
    blob_ref = stores.blobs.put(b"pixels", ttl_s=100)
    stores.jobs.create(job_id, _fields(blob_ref), idempotency="scan-3")
    assert stores.jobs.discard_unsent(job_id, model="fraud", idempotency="scan-3") == "discarded"
    assert stores.jobs.views([job_id]) == [None]
    assert not stores.text.exists(blob_key(blob_ref), idempotency_key("fraud", "scan-3"))
    retry = new_job_id()
    assert stores.jobs.create(retry, _fields(), idempotency="scan-3") == retry


def test_discard_unsent_leaves_a_job_a_worker_already_took(stores: Stores) -> None:
    job_id = new_job_id()
    stores.jobs.create(job_id, _fields(), idempotency="scan-4")
    stores.jobs.claim(job_id, node="n", pid=1, lease_s=30)
    assert stores.jobs.discard_unsent(job_id, model="fraud", idempotency="scan-4") == "running"
    assert stores.jobs.view(job_id)["status"] == "running"
    assert stores.jobs.create(new_job_id(), _fields(), idempotency="scan-4") == job_id


def test_discard_unsent_keeps_a_key_that_another_job_now_holds(stores: Stores) -> None:
    old, new = new_job_id(), new_job_id()
    stores.jobs.create(old, _fields(), idempotency="k")
    stores.text.delete(job_key(old))
    stores.jobs.create(new, _fields(), idempotency="k")
    stores.jobs.discard_unsent(old, model="fraud", idempotency="k")
    assert stores.text.get(idempotency_key("fraud", "k")) == new


def test_many_jobs_in_a_few_script_calls_each_behave_as_alone(stores: Stores) -> None:
    # Given 250 jobs (three script calls of the many-jobs form), two sharing an idempotency key across a call
    # boundary, and Redis having lost its scripts (a restart)
    stores.text.script_flush()
    jobs = [NewJob(job_id=new_job_id(), fields=_fields(f"b{i}"), blob=b"x") for i in range(250)]
    jobs[99] = NewJob(job_id=jobs[99].job_id, fields=_fields("b99"), idempotency="tx-9", blob=b"x")
    jobs[100] = NewJob(job_id=jobs[100].job_id, fields=_fields("b100"), idempotency="tx-9", blob=b"x")
    stored = stores.jobs.create_many(jobs, blob_ttl_s=100)
    assert stored[100] == jobs[99].job_id and stored[:100] + stored[101:] == [j.job_id for j in jobs if j != jobs[100]]
    ids = [job_id for i, job_id in enumerate(stored) if i != 100]
    # When they are claimed in one round trip, one of them cancelled first
    stores.jobs.cancel(ids[150])
    pipe = stores.text.pipeline(transaction=False)
    calls = stores.jobs.claim_all(ids, node="n", pid=7, lease_s=30, client=pipe)
    claims = [stores.jobs.claim_result(r) for r in stores.jobs.replies_of(stores.jobs.execute(pipe)[:calls])]
    # Then each has its own reply, and begin and finish answer per job too
    assert calls == 3 and [c.outcome for c in claims] == ["claimed"] * 150 + ["cancelled"] + ["claimed"] * 98
    leases = [(job_id, claim.token) for job_id, claim in zip(ids, claims, strict=True)]
    leases[3] = (ids[3], 99)  # an attempt that lost its job
    assert stores.jobs.begin(leases) == [i not in (3, 150) for i in range(249)]
    outcomes = [
        Outcome(job_id, token, JobStatus.SUCCEEDED, result={"i": i}) for i, (job_id, token) in enumerate(leases)
    ]
    replies = stores.jobs.finish(outcomes)
    assert replies == ["fenced" if i in (3, 150) else "ok" for i in range(249)]
    assert stores.jobs.view(ids[200])["result"] == {"i": 200}
    assert stores.jobs.view(ids[3])["status"] == "running"


def test_concurrent_submissions_never_fill_a_queue_past_its_depth(redis_url: str) -> None:
    # Given four submitters racing to put 10 jobs each into a queue with room for 12
    def submit(_: int) -> list[str]:
        stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
        jobs = [NewJob(job_id=new_job_id(), fields=_fields(f"race-{uuid.uuid4().hex}"), blob=b"x") for _ in range(10)]
        try:
            return [s for job in jobs for s in stores.jobs.create_many([job], blob_ttl_s=100, max_queue_depth=12)]
        finally:
            stores.text.close()

    with ThreadPoolExecutor(4) as pool:
        stored = [s for part in pool.map(submit, range(4)) for s in part]
    # Then exactly 12 are queued; the rest are refused and leave no upload behind
    accepted = [s for s in stored if s != QUEUE_FULL]
    assert len(accepted) == 12 and stored.count(QUEUE_FULL) == 28
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    assert stores.jobs.model_queue_depths(["fraud"]) == {"fraud": 12}
    assert len(list(stores.text.scan_iter(blob_key("race-*")))) == 12
    stores.text.close()
