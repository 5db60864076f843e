"""Long-polling, `Prefer: wait`, bulk submission and bulk status reads, over real HTTP with real workers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from inferq.config import Settings
from inferq.producers.demo import fraud_example
from inferq.producers.operations import build_reconciler
from inferq.protocol.celery_config import message_job_ids
from inferq.protocol.connections import redis_client
from inferq.protocol.errors import RemoteError
from inferq.protocol.jobs import JobStore
from inferq.protocol.keys import job_key, many_task_name_for, published_key, queue_lists
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow
_JOB_TIMEOUT_S = 300.0
_WAITERS = 200
_QUIET_S = 1.5


def test_get_with_wait_s_answers_with_the_finished_job(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit("fraud", inputs=fraud_example(rows=2))
    job = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}", params={"wait_s": 60}, headers=stack.auth, timeout=90).json()
    assert job["status"] == "succeeded" and job["result"]["outputs"][0]["shape"] == [2, 1]


def test_get_with_wait_s_answers_with_the_current_state_when_time_is_up(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit("fraud-idle", inputs=fraud_example(rows=1))
    started = time.monotonic()
    job = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}", params={"wait_s": 1.5}, headers=stack.auth, timeout=30).json()
    assert job["status"] == "queued"
    assert time.monotonic() - started >= 1.5  # it did wait


def test_a_waiting_request_is_woken_when_its_job_ends(stack: Stack) -> None:
    # Given a job no worker will take, and a request waiting up to 60 s for it
    with stack.client() as client:
        job_id = client.submit("fraud-idle", inputs=fraud_example(rows=1))
    answer: dict[str, Any] = {}

    def wait() -> None:
        started = time.monotonic()
        answer["job"] = httpx.get(
            f"{stack.api_url}/v1/jobs/{job_id}", params={"wait_s": 60}, headers=stack.auth, timeout=90
        ).json()
        answer["waited_s"] = time.monotonic() - started

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    # When the job ends (cancelled) while the request waits
    assert httpx.delete(f"{stack.api_url}/v1/jobs/{job_id}", headers=stack.auth).json()["status"] == "cancelled"
    waiter.join(timeout=90)
    # Then the request answers with the final state, long before its wait was up
    assert answer["job"]["status"] == "cancelled"
    assert answer["waited_s"] < 45


def test_many_waiting_requests_cost_redis_nothing_until_their_jobs_end(stack: Stack) -> None:
    # Given 200 jobs that no worker takes, each waited for by a request of its own, all parked in the API
    with stack.client() as client:
        entries = client.submit_many("fraud-idle", inputs=[fraud_example(rows=1)] * _WAITERS)
    job_ids = [entry["job_id"] for entry in entries]
    already_waiting = _waiting_requests(stack)
    baseline = _quietest_redis_commands(stack)
    answers: list[tuple[str, float]] = []
    waiters = threading.Thread(target=lambda: answers.extend(asyncio.run(_wait_for_each(stack, job_ids))))
    waiters.start()
    _until(lambda: _waiting_requests(stack) >= _WAITERS)  # ours (a waiter another test left might end meanwhile)
    # When nothing happens to their jobs for a while, the waiting requests send Redis nothing (a read every second
    # would be 300 commands a window here; the stack's own heartbeats and broker polls are the baseline)
    parked = _quietest_redis_commands(stack)
    assert parked - baseline < _WAITERS // 4, (baseline, parked)
    # When the jobs end (cancelled), every request answers with the final state, long before its wait is up
    ended_at = time.monotonic()
    with httpx.Client(base_url=stack.api_url, headers=stack.auth, timeout=30) as http:
        for job_id in job_ids:
            assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    waiters.join(timeout=120)
    assert [status for status, _ in answers] == ["cancelled"] * _WAITERS
    assert all(ended_at < answered_at < ended_at + 45 for _, answered_at in answers)
    assert _waiting_requests(stack) <= already_waiting


async def _wait_for_each(stack: Stack, job_ids: list[str]) -> list[tuple[str, float]]:
    """Each job waited for by a GET of its own (wait_s=60), all at once; each answer's status and when it came."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth, timeout=90, limits=limits) as http:

        async def wait(job_id: str) -> tuple[str, float]:
            job = (await http.get(f"/v1/jobs/{job_id}", params={"wait_s": 60})).json()
            return str(job["status"]), time.monotonic()

        return list(await asyncio.gather(*(wait(job_id) for job_id in job_ids)))


def _waiting_requests(stack: Stack) -> int:
    """The API's `inferq_api_waiting_requests` gauge."""
    text = httpx.get(f"{stack.api_url}/metrics", timeout=30).text
    [line] = [line for line in text.splitlines() if line.startswith("inferq_api_waiting_requests ")]
    return int(float(line.split()[1]))


def _quietest_redis_commands(stack: Stack) -> int:
    """The fewest commands Redis processed in one of three windows of `_QUIET_S`: what goes on steadily (heartbeats,
    broker polls, a poll by waiting requests if there were one), not a burst that an earlier test left behind."""
    client = redis_client(stack.redis_url, decode=True)
    try:
        counts = []
        for _ in range(3):
            before = int(client.info("stats")["total_commands_processed"])
            time.sleep(_QUIET_S)
            counts.append(int(client.info("stats")["total_commands_processed"]) - before - 1)  # INFO counts itself
        return min(counts)
    finally:
        client.close()


def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_get_with_a_negative_wait_is_a_422(stack: Stack) -> None:
    response = httpx.get(f"{stack.api_url}/v1/jobs/abc", params={"wait_s": -1}, headers=stack.auth)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_prefer_wait_answers_200_with_the_finished_job_inline(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.api_url}/v1/models/fraud/jobs",
        json={"inputs": fraud_example(rows=3)},
        headers={**stack.auth, "Prefer": "wait=60"},
        timeout=90,
    )
    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=60"
    job = response.json()
    assert job["status"] == "succeeded" and job["result"]["outputs"][0]["shape"] == [3, 1]
    assert response.headers["content-location"].endswith(f"/v1/jobs/{job['job_id']}")


def test_prefer_wait_answers_202_when_the_job_is_not_done_in_time(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.api_url}/v1/models/fraud-idle/jobs",
        json={"inputs": fraud_example(rows=1)},
        headers={**stack.auth, "Prefer": "respond-async, wait=1"},
        timeout=30,
    )
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=1"
    assert response.json()["status"] == "queued"


def test_a_json_bulk_submission_makes_independent_jobs_and_a_bad_item_fails_alone(stack: Stack) -> None:
    # Given four good jobs of different sizes and two bad ones in one request
    jobs: list[dict[str, Any]] = [{"inputs": fraud_example(rows=rows)} for rows in (1, 2, 3, 4)]
    jobs.insert(1, {"inputs": [{**fraud_example(rows=1)[0], "shape": [1, 29]}]})
    jobs.append({"inputs": "nope"})
    response = httpx.post(
        f"{stack.api_url}/v1/models/fraud/jobs/bulk", json={"jobs": jobs}, headers=stack.auth, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    # Then each good item has its own job, each bad item its own error
    assert body["accepted"] == 4 and body["rejected"] == 2
    entries = body["jobs"]
    assert entries[1]["error"]["code"] == "invalid_tensor" and entries[5]["error"]["code"] == "invalid_request"
    job_ids = [entries[i]["job_id"] for i in (0, 2, 3, 4)]
    assert len(set(job_ids)) == 4 and all(entries[i]["status"] == "queued" for i in (0, 2, 3, 4))
    # And a bulk read answers when all are final, each with its own result
    query = {"job_ids": job_ids, "wait_s": 60}
    answer = httpx.post(f"{stack.api_url}/v1/jobs/query", json=query, headers=stack.auth, timeout=90).json()
    assert answer["pending"] == 0
    assert [j["status"] for j in answer["jobs"]] == ["succeeded"] * 4
    assert [j["result"]["outputs"][0]["shape"][0] for j in answer["jobs"]] == [1, 2, 3, 4]


def test_a_bulk_submission_travels_in_chunks_and_each_job_stays_its_own(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given five jobs of a model that no worker serves, submitted in one bulk request
    jobs = JobStore(redis_client(stack.redis_url, decode=True), queued_ttl_s=60, result_ttl_s=60)
    [depth_before] = jobs.model_queue_depths(["fraud-idle"]).values()
    body = {"jobs": [{"inputs": fraud_example(rows=1)} for _ in range(5)]}
    url = f"{stack.api_url}/v1/models/fraud-idle/jobs/bulk"
    job_ids = [e["job_id"] for e in httpx.post(url, json=body, headers=stack.auth, timeout=60).json()["jobs"]]
    # Then the queue depth (backpressure, metrics, `inferq status`) counts five jobs, not one message
    assert jobs.model_queue_depths(["fraud-idle"]) == {"fraud-idle": depth_before + 5}
    # And they wait in the broker as one message that names each of its jobs
    for name, value in stack.env.items():
        if name.startswith("INFERQ_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    broker = redis_client(stack.redis_url, decode=True)
    lists = queue_lists("fraud-idle", buckets=settings.tenant_buckets)
    chunks = [
        json.loads(raw)
        for name in lists
        for raw in broker.lrange(name, 0, -1)
        if set(job_ids) & set(message_job_ids(raw))
    ]
    assert len(chunks) == 1 and chunks[0]["headers"]["task"] == many_task_name_for("fraud-idle")
    assert message_job_ids(json.dumps(chunks[0]))[1:] == job_ids
    # And each job is still its own: one is cancelled, the others stay queued
    assert httpx.delete(f"{stack.api_url}/v1/jobs/{job_ids[2]}", headers=stack.auth).status_code == 200
    states = [httpx.get(f"{stack.api_url}/v1/jobs/{j}", headers=stack.auth).json()["status"] for j in job_ids]
    assert states == ["queued", "queued", "cancelled", "queued", "queued"]
    assert jobs.model_queue_depths(["fraud-idle"]) == {"fraud-idle": depth_before + 4}
    # And the lost-message check finds them in the broker: none is published a second time
    published = [broker.zscore(published_key(), j) for j in job_ids]
    monkeypatch.setenv("INFERQ_LOST_MESSAGE_CHECK_S", "0.01")
    time.sleep(0.05)
    build_reconciler(Settings()).tick(check_lost=True)
    assert [broker.zscore(published_key(), j) for j in job_ids] == published
    assert (
        sum(1 for name in lists for raw in broker.lrange(name, 0, -1) if set(job_ids) & set(message_job_ids(raw))) == 1
    )


def test_a_bulk_request_retried_with_its_idempotency_key_gets_the_same_jobs(stack: Stack) -> None:
    body = {"jobs": [{"inputs": fraud_example(rows=1)}, {"inputs": fraud_example(rows=2)}]}
    url = f"{stack.api_url}/v1/models/fraud-idle/jobs/bulk"
    first = httpx.post(url, json=body, headers={**stack.auth, "Idempotency-Key": "batch-7"}).json()["jobs"]
    again = httpx.post(url, json=body, headers={**stack.auth, "Idempotency-Key": "batch-7"}).json()["jobs"]
    assert [j["job_id"] for j in again] == [j["job_id"] for j in first]
    assert [j["replayed"] for j in first] == [False, False] and [j["replayed"] for j in again] == [True, True]


def test_a_multipart_bulk_upload_of_images(stack: Stack) -> None:
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in stack.samples[:3]]
    files.append(("file", ("notes.txt", b"not an image", "text/plain")))
    response = httpx.post(
        f"{stack.api_url}/v1/models/chest-xray/jobs/bulk",
        files=files,
        data={"priority": "4"},
        headers=stack.auth,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    entries = response.json()["jobs"]
    assert entries[3]["error"]["code"] == "unsupported_media_type"
    with stack.client() as client:
        jobs = client.results([e["job_id"] for e in entries[:3]], wait_s=_JOB_TIMEOUT_S)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    assert all(len(j["result"]["findings"]) == 14 for j in jobs)


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"jobs": []}}, 422, "invalid_request"),
        ({"json": {"inputs": fraud_example(rows=1)}}, 422, "invalid_request"),
        ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 422, "invalid_request"),
        ({"files": [("other", ("a.png", b"x"))]}, 422, "invalid_request"),
    ],
)
def test_a_malformed_bulk_request_is_a_4xx(stack: Stack, kwargs: dict[str, Any], status: int, code: str) -> None:
    headers = {**stack.auth, **kwargs.get("headers", {})}
    response = httpx.post(f"{stack.api_url}/v1/models/fraud/jobs/bulk", **{**kwargs, "headers": headers})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_query_reports_unknown_ids_and_can_return_when_any_job_ends(stack: Stack) -> None:
    with stack.client() as client:
        done = client.submit_and_wait("fraud", inputs=fraud_example(rows=1), wait_s=_JOB_TIMEOUT_S)
        idle = client.submit("fraud-idle", inputs=fraud_example(rows=1))
        assert done["status"] == "succeeded"
        jobs = client.results([idle, done["job_id"], "nope"], wait_s=30, until="any")
    assert [j.get("status") for j in jobs] == ["queued", "succeeded", None]
    assert jobs[2]["error"]["code"] == "unknown_job"


def test_the_client_submits_many_and_reads_them_back(stack: Stack) -> None:
    with stack.client() as client:
        entries = client.submit_many("fraud", inputs=[fraud_example(rows=r) for r in (1, 2, 3)], jobs_per_request=2)
        assert [e["status"] for e in entries] == ["queued"] * 3
        jobs = client.results([e["job_id"] for e in entries], wait_s=_JOB_TIMEOUT_S)
        one = client.result(entries[0]["job_id"], wait_s=_JOB_TIMEOUT_S)
        images = client.submit_many("chest-xray", stack.samples[:2])
    assert [j["result"]["outputs"][0]["shape"] for j in jobs] == [[1, 1], [2, 1], [3, 1]]
    assert one["status"] == "succeeded"
    assert [e["status"] for e in images] == ["queued", "queued"]


def test_bulk_uploads_carry_each_files_idempotency_key_and_the_options(stack: Stack) -> None:
    # Given two uploads sent in one multipart request, each with its own key, at STAT priority
    keys = [f"bulk-key-{uuid.uuid4().hex}" for _ in range(2)]
    with stack.client() as client:
        first = client.submit_many("chest-xray", stack.samples[:2], idempotency_keys=keys, priority="stat")
        # When the same request is sent again
        again = client.submit_many("chest-xray", stack.samples[:2], idempotency_keys=keys, priority="stat")
    # Then each key named one job, and the option reached both
    assert len({e["job_id"] for e in first}) == 2
    assert [e["job_id"] for e in again] == [e["job_id"] for e in first]
    records = redis_client(stack.redis_url, decode=True)
    assert [records.hget(job_key(e["job_id"]), "priority") for e in first] == ["stat", "stat"]


@pytest.mark.parametrize("kind", ["png", "jpg", "dcm"])
def test_a_single_upload_carries_its_options_to_the_job(stack: Stack, kind: str) -> None:
    # Given one sample of each kind, submitted with options by the client (a bare image body, options in headers)
    [sample] = [path for path in stack.samples if path.suffix == f".{kind}"][:1]
    key = f"one-{kind}-{uuid.uuid4().hex}"
    with stack.client() as client:
        job_id = client.submit("chest-xray", sample, priority="stat", deadline_s=600, idempotency_key=key)
        again = client.submit("chest-xray", sample, priority="stat", deadline_s=600, idempotency_key=key)
        job = client.result(job_id, wait_s=_JOB_TIMEOUT_S)
    # Then the key, the priority and the deadline reached the job, and it ran
    assert again == job_id and job["status"] == "succeeded"
    record = redis_client(stack.redis_url, decode=True).hgetall(job_key(job_id))
    assert record["priority"] == "stat"
    assert float(record["expires_at"]) - float(record["submitted_at"]) == pytest.approx(600)


def test_a_file_of_no_known_kind_is_refused_clearly(stack: Stack) -> None:
    with stack.client() as client, pytest.raises(RemoteError) as refused:
        client.submit("chest-xray", b"not an image at all", filename="notes.txt")
    assert refused.value.remote_http_status == 415 and refused.value.remote_code == "unsupported_media_type"


def test_requests_sent_at_once_keep_each_entry_in_its_jobs_place(stack: Stack) -> None:
    # Given nine jobs of different sizes in five requests, four of them on their way at once
    rows = [1, 2, 3, 4, 1, 2, 3, 4, 5]
    with stack.client() as client:
        entries = client.submit_many(
            "fraud", inputs=[fraud_example(rows=r) for r in rows], jobs_per_request=2, requests_in_flight=4
        )
        jobs = client.results([e["job_id"] for e in entries], wait_s=_JOB_TIMEOUT_S)
    # Then the entries come back in the order given: each job's output has its own input's rows
    assert len({e["job_id"] for e in entries}) == 9
    assert [j["result"]["outputs"][0]["shape"] for j in jobs] == [[r, 1] for r in rows]


def test_cli_submit_of_a_folder_uses_one_bulk_request_and_waits(stack: Stack) -> None:
    folder = stack.tmp / "folder"
    folder.mkdir(exist_ok=True)
    for path in stack.samples[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "readme.txt").write_text("not an image")
    requests_before = _submissions(stack, "chest-xray")
    argv = [sys.executable, "-m", "inferq.producers.cli", "submit", str(folder), "--model", "chest-xray", "--wait"]
    env = {**stack.env, "INFERQ_API_URL": stack.api_url}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr  # the text file is refused, and the exit status says so
    by_name = {line["file"].rsplit("/", 1)[-1]: line for line in lines}
    assert set(by_name) == {p.name for p in stack.samples[:3]} | {"readme.txt"}
    assert by_name["readme.txt"]["status"] == "rejected"
    assert all(by_name[p.name]["status"] == "succeeded" for p in stack.samples[:3]), [
        (x["file"], x["status"], x.get("error")) for x in lines
    ]
    # One bulk request, not one request per file.
    assert _submissions(stack, "chest-xray") == {
        "submit_bulk": requests_before["submit_bulk"] + 1,
        "submit_job": requests_before["submit_job"],
    }


def _submissions(stack: Stack, model: str) -> dict[str, int]:
    """The API's submit requests for `model` so far, by action, as its JSON-lines access log records them."""
    counts = {"submit_bulk": 0, "submit_job": 0}
    for line in stack.services.log_of("api").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # uvicorn's own startup lines
        if isinstance(entry, dict) and entry.get("model") == model and entry.get("action") in counts:
            counts[entry["action"]] += 1
    return counts
