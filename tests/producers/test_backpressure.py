"""Refusing load in time: past a model's `max_queue_depth` a submission answers 429 with Retry-After and nothing is
enqueued; the client waits as told and then gets through. Real Redis, real HTTP, no worker draining the queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from inferq.producers.client import InferqClient, RetryPolicy
from inferq.producers.demo import fraud_example
from inferq.protocol.jobs import JobStore
from inferq.protocol.keys import job_key, model_waiting_key, queue_lists, tenant_waiting_key
from tests.producers.conftest import LoneApi


def _queued_messages(lone: LoneApi) -> int:
    with lone.store() as store:
        return sum(int(store.llen(name)) for name in queue_lists("tiny"))


def _submit(lone: LoneApi) -> httpx.Response:
    return lone.http.post(f"{lone.url}/v1/models/tiny/jobs", json={"inputs": fraud_example(rows=1)}, timeout=30)


def test_past_max_queue_depth_a_submission_is_refused_with_429_and_nothing_is_enqueued(lone: LoneApi) -> None:
    assert [_submit(lone).status_code for _ in range(2)] == [202, 202]
    refused = _submit(lone)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full" and refused.json()["error"]["retryable"] is True
    assert _queued_messages(lone) == 2 and lone.job_count() == 2
    # Another model, with its own limit, is not affected.
    other = lone.http.post(f"{lone.url}/v1/models/fraud/jobs", json={"inputs": fraud_example(rows=1)}, timeout=30)
    assert other.status_code == 202
    models = {m["name"]: m for m in lone.http.get(f"{lone.url}/v1/models").json()["models"]}
    assert models["tiny"]["max_queue_depth"] == 2 and models["tiny"]["queue_depth"] == 2


def test_a_bulk_submission_takes_what_fits_and_refuses_the_rest_item_by_item(lone: LoneApi) -> None:
    jobs = [{"inputs": fraud_example(rows=1)} for _ in range(3)]
    body = lone.http.post(f"{lone.url}/v1/models/tiny/jobs/bulk", json={"jobs": jobs}, timeout=30).json()
    assert body["accepted"] == 2 and body["rejected"] == 1
    assert body["jobs"][2]["error"]["code"] == "queue_full"
    assert _queued_messages(lone) == 2 and lone.job_count() == 2
    # With no room at all, the whole request is refused like a single one.
    full = lone.http.post(f"{lone.url}/v1/models/tiny/jobs/bulk", json={"jobs": jobs[:1]}, timeout=30)
    assert full.status_code == 429 and full.headers["retry-after"] == "1"


def test_the_client_waits_as_retry_after_says_then_gets_through(lone: LoneApi) -> None:
    # Given a full queue
    waiting = [_submit(lone) for _ in range(2)]
    assert [r.status_code for r in waiting] == [202, 202]
    with (
        ThreadPoolExecutor(1) as pool,
        InferqClient(lone.url, api_key=lone.key, retry=RetryPolicy(first_delay_s=0.01)) as client,
    ):
        started = time.monotonic()
        submitted = pool.submit(client.submit, "tiny", inputs=fraud_example(rows=1))
        # When a worker takes the waiting jobs shortly after the client was refused
        time.sleep(0.3)
        with lone.store() as store:
            jobs = JobStore(store, queued_ttl_s=60, result_ttl_s=60)
            for response in waiting:
                assert jobs.claim_result(jobs.claim(response.json()["job_id"], node="w", pid=1, lease_s=60)).claimed
        submitted.result(timeout=60)
        # Then the client's retry came no sooner than Retry-After (1 s), not after its own 10 ms backoff
        assert time.monotonic() - started >= 1.0
    assert _queued_messages(lone) == 3  # nothing consumed the messages: the claims stood in for a worker


def test_bulk_requests_past_their_limits_are_refused_before_anything_is_stored(lone: LoneApi) -> None:
    url = f"{lone.url}/v1/models/fraud/jobs/bulk"
    too_many = lone.http.post(url, json={"jobs": [{"inputs": fraud_example(rows=1)}] * 6}, timeout=30)
    assert too_many.status_code == 422 and "at most 5 jobs" in too_many.json()["error"]["message"]
    too_big = lone.http.post(url, json={"jobs": [{"inputs": fraud_example(rows=200)}] * 5}, timeout=30)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    files = [("file", (f"{i}.png", b"\x89PNG" + b"\x00" * 60_000)) for i in range(4)]
    assert lone.http.post(f"{lone.url}/v1/models/chest-xray/jobs/bulk", files=files, timeout=30).status_code == 413
    ids = [f"id{i}" for i in range(6)]
    assert lone.http.post(f"{lone.url}/v1/jobs/query", json={"job_ids": ids}, timeout=30).status_code == 422
    assert lone.job_count() == 0


def test_waiting_entries_whose_record_is_gone_stop_counting_after_a_reconciler_pass(lone: LoneApi) -> None:
    # Given a full queue whose job records then vanish unfinalised (Redis evicted them, or no reconciler ran
    # for their whole keep time)
    assert [_submit(lone).status_code for _ in range(2)] == [202, 202]
    with lone.store() as store:
        store.delete(*store.scan_iter(job_key("*")))
    assert _submit(lone).status_code == 429  # the depth still counts them
    # When one reconciler pass runs (a real `inferq reconciler --once` against the same Redis)
    env = {**os.environ, "INFERQ_REDIS_URL": lone.redis.url, "INFERQ_REGISTRY_PATH": lone.registry_path}
    done = subprocess.run(
        [sys.executable, "-m", "inferq.producers.cli", "reconciler", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # Then it reports and removes them from every waiting set, and the queue takes jobs again
    assert json.loads(done.stdout.strip().splitlines()[-1])["ghosts_removed"] == 4  # the model's set and the tenant's
    with lone.store() as store:
        assert store.zcard(model_waiting_key("tiny")) == 0
        assert store.zcard(tenant_waiting_key("lone", "tiny")) == 0
    assert _submit(lone).status_code == 202
