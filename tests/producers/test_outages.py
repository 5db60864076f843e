"""Redis and broker outages: the API answers 503 with Retry-After, the client retries with the same idempotency
key, and no outage makes a second job or replays a failure. Real Redis stopped and restarted, real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.client import InferqClient, RetryPolicy
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import free_port
from inferq.producers.submit import JobSubmitter, SubmitOptions
from inferq.protocol.celery_config import build_celery
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import open_stores
from inferq.protocol.errors import BackendUnavailable, RemoteError
from inferq.protocol.intake import TensorUpload
from inferq.protocol.keys import idempotency_key
from inferq.protocol.registry import load_registry
from tests.producers.conftest import LoneApi


def _inputs() -> dict[str, Any]:
    return {"inputs": fraud_example(rows=1)}


def test_every_route_answers_503_with_retry_after_while_redis_is_down(lone: LoneApi) -> None:
    lone.redis.stop()
    try:
        answers = [
            lone.http.post(f"{lone.url}/v1/models/fraud/jobs", json=_inputs(), timeout=30),
            lone.http.post(f"{lone.url}/v1/models/fraud/jobs/bulk", json={"jobs": [_inputs()]}, timeout=30),
            lone.http.get(f"{lone.url}/v1/jobs/abc", params={"wait_s": 5}, timeout=30),
            lone.http.post(f"{lone.url}/v1/jobs/query", json={"job_ids": ["abc"]}, timeout=30),
            lone.http.get(f"{lone.url}/v1/models", timeout=30),
        ]
    finally:
        lone.redis.start()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"] == {**answer.json()["error"], "code": "backend_unavailable", "retryable": True}
    # And once Redis is back, the same API serves again without a restart.
    assert lone.http.post(f"{lone.url}/v1/models/fraud/jobs", json=_inputs(), timeout=30).status_code == 202


def test_the_client_retries_through_a_redis_restart_and_makes_one_job(lone: LoneApi) -> None:
    # Given Redis is down when the client submits
    lone.redis.stop()
    with (
        ThreadPoolExecutor(1) as pool,
        InferqClient(lone.url, api_key=lone.key, retry=RetryPolicy(give_up_after_s=60)) as client,
    ):
        submitted = pool.submit(client.submit, "fraud", inputs=fraud_example(rows=1))
        time.sleep(1.5)
        assert not submitted.done()
        # When Redis comes back
        lone.redis.start()
        job_id = submitted.result(timeout=90)
    # Then the submission went through once, under the idempotency key the client made for it (Redis keeps only
    # its hash, so the one idempotency entry of the model is what names the job)
    assert lone.job_count() == 1
    with lone.store() as store:
        entries = list(store.scan_iter(idempotency_key("fraud", "*")))
        assert len(entries) == 1 and store.get(entries[0]) == job_id


def test_a_client_that_gives_up_raises_the_503(lone: LoneApi) -> None:
    lone.redis.stop()
    try:
        retry = RetryPolicy(max_attempts=2, first_delay_s=0.1)
        with InferqClient(lone.url, api_key=lone.key, retry=retry) as client, pytest.raises(RemoteError) as caught:
            client.submit("fraud", inputs=fraud_example(rows=1))
    finally:
        lone.redis.start()
    assert caught.value.remote_http_status == 503 and caught.value.remote_code == "backend_unavailable"


class _LoseFirstAnswer(BaseHTTPRequestHandler):
    """A proxy that forwards every POST but drops the connection instead of returning the first answer, as a
    network failure after the server acted would."""

    upstream = ""
    posts = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = httpx.post(self.upstream + self.path, content=body, headers=headers, timeout=30)
        with self.lock:
            type(self).posts += 1
            first = type(self).posts == 1
        if first:
            self.close_connection = True
            return
        self.send_response(answer.status_code)
        for name in ("content-type", "idempotent-replayed", "location"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def lossy_proxy(lone: LoneApi) -> Iterator[str]:
    _LoseFirstAnswer.upstream = lone.url
    _LoseFirstAnswer.posts = 0
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _LoseFirstAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_lost_answer_is_retried_with_the_same_key_and_makes_no_second_job(lone: LoneApi, lossy_proxy: str) -> None:
    # Given a connection that loses the API's first answer (the job was created)
    with InferqClient(lossy_proxy, api_key=lone.key, retry=RetryPolicy(first_delay_s=0.05)) as client:
        # When the client submits once
        job_id = client.submit("fraud", inputs=fraud_example(rows=1))
    # Then its retry carried the same key, and got the job the first attempt made
    assert _LoseFirstAnswer.posts == 2
    assert lone.job_count() == 1
    assert lone.http.get(f"{lone.url}/v1/jobs/{job_id}").json()["status"] == "queued"


def test_a_job_the_broker_refused_is_removed_and_its_key_makes_a_fresh_job(redis_url: str) -> None:
    # Given a job store that works and a broker that does not answer
    registry = load_registry(DEFAULT_REGISTRY_PATH)
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    dead_broker = build_celery(settings, registry)
    dead_broker.conf.broker_connection_timeout = 1
    submitter = JobSubmitter(settings=settings, registry=registry, stores=stores, celery_app=dead_broker)
    upload = TensorUpload(inputs=[TensorPayload.model_validate(fraud_example(rows=1)[0])])
    # When a submission cannot be published
    with pytest.raises(BackendUnavailable):
        submitter.submit("fraud", upload, SubmitOptions(idempotency_key="pay-1"))
    # Then nothing of it is left: no record, no key, no blob (so nothing replays the failure)
    assert stores.text.dbsize() == 0
    # And the same key, once the broker is back, makes a fresh queued job
    live_broker = build_celery(Settings(redis_url=redis_url), registry)
    live_settings = Settings(redis_url=redis_url)
    working = JobSubmitter(settings=live_settings, registry=registry, stores=stores, celery_app=live_broker)
    receipt = working.submit("fraud", upload, SubmitOptions(idempotency_key="pay-1"))
    assert receipt.replayed is False and stores.jobs.view(receipt.job_id)["status"] == "queued"
    dead_broker.close()
    live_broker.close()
    stores.text.close()
