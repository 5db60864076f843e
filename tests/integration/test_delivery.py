"""Delivery through the whole stack: batch sizes that ran, callbacks that arrive signed and show in the job."""

from __future__ import annotations

import time

import pytest

from inferq.producers.demo import fraud_example
from inferq.protocol.errors import RemoteError
from tests.callback_receiver import CallbackReceiver
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow


def test_jobs_there_together_share_forward_passes_and_say_so(stack: Stack) -> None:
    # Given 16 X-rays sent in one bulk request to one worker process
    with stack.client() as client:
        files = [stack.samples[i % len(stack.samples)] for i in range(16)]
        entries = client.submit_many("chest-xray", files)
        jobs = client.results([entry["job_id"] for entry in entries], wait_s=300)
    # Then each job is its own, succeeded, and some ran in a batch of several (visible in the job)
    assert [job["status"] for job in jobs] == ["succeeded"] * 16
    sizes = [job["batch_size"] for job in jobs]
    assert all(1 <= size <= 8 for size in sizes), sizes  # chest-xray's max_batch_size is 8
    assert max(sizes) > 1, sizes


def test_a_callback_arrives_signed_and_its_delivery_shows_in_the_job(stack: Stack) -> None:
    receiver = CallbackReceiver()
    try:
        with stack.client() as client:
            job_id = client.submit("fraud", inputs=fraud_example(rows=1), callback_url=receiver.url)
            assert client.result(job_id, wait_s=120)["status"] == "succeeded"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not receiver.deliveries:
                time.sleep(0.1)
            [delivery] = receiver.deliveries
            assert delivery["id"] == f"msg_{job_id}" and receiver.bad_signatures == 0
            assert delivery["payload"]["type"] == "job.succeeded"
            assert delivery["payload"]["data"]["job_id"] == job_id
            assert delivery["payload"]["data"]["result"]["outputs"][0]["shape"] == [1, 1]
            while time.monotonic() < deadline and client.status(job_id)["callback"]["state"] != "delivered":
                time.sleep(0.1)
            callback = client.status(job_id)["callback"]
        assert callback["state"] == "delivered" and callback["attempts"] == 1 and callback["last"] == "HTTP 204"
    finally:
        receiver.close()


def test_a_job_past_its_deadline_reads_expired_without_any_worker(stack: Stack) -> None:
    # fraud-idle has no worker: only the deadline can end this job, and a read sees it at once
    with stack.client() as client:
        job_id = client.submit("fraud-idle", inputs=fraud_example(rows=1), deadline_s=0.5)
        assert client.status(job_id)["status"] == "queued"
        time.sleep(0.8)
        job = client.status(job_id)
    assert job["status"] == "expired" and job["error"]["code"] == "expired" and job["attempts"] == 0


def test_a_deadline_out_of_range_is_a_422(stack: Stack) -> None:
    with stack.client() as client:
        for bad in (0, -1, 10**9):
            with pytest.raises(RemoteError) as caught:
                client.submit("fraud", inputs=fraud_example(rows=1), deadline_s=bad)
            assert caught.value.remote_http_status == 422


def test_a_callback_to_an_address_not_allowed_is_refused_at_send_time(stack: Stack) -> None:
    # The stack allows 127.0.0.1 only: 127.0.0.2 is loopback too, and not on the list
    with stack.client() as client:
        job_id = client.submit("fraud", inputs=fraud_example(rows=1), callback_url="http://127.0.0.2:9/hook")
        assert client.result(job_id, wait_s=120)["status"] == "succeeded"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.status(job_id)["callback"]["state"] != "failed":
            time.sleep(0.1)
        callback = client.status(job_id)["callback"]
    assert callback["state"] == "failed" and callback["last"] == "target_refused"
