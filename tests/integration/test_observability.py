"""Seeing the system: Prometheus metrics of the API and of a worker, JSON log lines, and `inferq status`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inferq.config import Settings
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import free_port
from inferq.producers.stack import ServiceStack
from inferq.producers.submit import JobSubmitter, SubmitOptions
from inferq.protocol.celery_config import build_celery
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.intake import TensorUpload
from inferq.protocol.registry import load_registry
from tests.integration.conftest import Stack

_TIMEOUT_S = 180.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _assert_no_job_ids(samples: Samples, job_ids: list[str]) -> None:
    for _, labels in samples:
        for _, value in labels:
            assert value not in job_ids and not re.fullmatch(r"[0-9a-f]{32}", value), value


def _run_fraud_jobs(stack: Stack, count: int) -> list[str]:
    with stack.client() as client:
        job_ids = [client.submit("fraud", inputs=fraud_example(rows=2)) for _ in range(count)]
        for job_id in job_ids:
            assert client.result(job_id, wait_s=_TIMEOUT_S)["status"] == "succeeded"
    return job_ids


def test_api_metrics_count_finished_jobs_per_model_without_job_ids(stack: Stack) -> None:
    # Given the cluster's counters before
    before = _scrape(f"{stack.api_url}/metrics")
    # When three fraud jobs run (no API key is needed to scrape)
    job_ids = _run_fraud_jobs(stack, 3)
    after = _scrape(f"{stack.api_url}/metrics")
    # Then the finished and attempt counters moved by three, and the gauges describe every model's queue
    finished = {"model": "fraud", "status": "succeeded", "code": ""}
    delta = _value(after, "inferq_jobs_finished_total", **finished) - _value(
        before, "inferq_jobs_finished_total", **finished
    )
    assert delta == 3
    attempts = _value(after, "inferq_job_attempts_total", model="fraud") - _value(
        before, "inferq_job_attempts_total", model="fraud"
    )
    assert attempts == 3
    assert _value(after, "inferq_redis_up") == 1
    assert _value(after, "inferq_worker_processes", queue="fraud") >= 1
    assert _value(after, "inferq_worker_slots", queue="fraud") >= 1
    registry = load_registry(Path(stack.env["INFERQ_REGISTRY_PATH"]))
    for model in registry:
        assert ("inferq_queue_depth", (("model", model),)) in after
        assert ("inferq_model_load", (("model", model),)) in after
    _assert_no_job_ids(after, job_ids)
    # And the API's and the worker's log lines about these jobs are JSON carrying the job id and the model
    for service, extra in (("api", {"tenant": "tests"}), ("worker", {})):
        lines = [json.loads(line) for line in stack.services.log_of(service).splitlines() if line.startswith("{")]
        # (the access log's lines are JSON too; the event lines are those with a level)
        ours = [line for line in lines if line.get("job_id") in job_ids and "level" in line]
        assert {line["job_id"] for line in ours} == set(job_ids), service
        assert all(line["model"] == "fraud" and extra.items() <= line.items() for line in ours), service


def test_status_without_a_job_id_lists_every_queue(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferq.producers.cli", "status"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    header, *rows = done.stdout.splitlines()
    assert header.split()[:6] == ["MODEL", "QUEUE", "WAITING", "OLDEST", "RUNNING", "WORKERS"]
    by_model = {row.split()[0]: row.split() for row in rows}
    assert set(by_model) == set(load_registry(Path(stack.env["INFERQ_REGISTRY_PATH"])))
    assert int(by_model["fraud"][5]) >= 1  # the stack's worker consumes fraud
    assert int(by_model["fraud-idle"][5]) == 0  # and nobody consumes fraud-idle


def _submit(submitter: JobSubmitter, count: int) -> list[str]:
    upload = TensorUpload(inputs=[TensorPayload.model_validate(t) for t in fraud_example(rows=2)])
    return [submitter.submit("fraud", upload, SubmitOptions()).job_id for _ in range(count)]


def _wait_succeeded(stores: Stores, job_ids: list[str]) -> list[dict[str, object]]:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        views = [stores.jobs.view(job_id) for job_id in job_ids]
        if all(v["status"] in ("succeeded", "failed") for v in views):
            assert all(v["status"] == "succeeded" for v in views), views
            return views
        time.sleep(0.1)
    raise AssertionError("jobs did not finish in time")


def test_worker_metrics_sum_its_nodes_and_keep_counts_of_a_killed_node(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(redis_url=redis_url)  # type: ignore[arg-type]
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_MODELS_DIR": str(settings.models_dir),
        "INFERQ_TORCH_THREADS": "1",
        "INFERQ_WORKER_METRICS_PORT": str(port),
    }
    registry = load_registry(settings.registry_path)
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=600)
    celery_app = build_celery(settings, registry)
    submitter = JobSubmitter(settings=settings, registry=registry, stores=stores, celery_app=celery_app)
    url = f"http://127.0.0.1:{port}/metrics"
    with ServiceStack(env, tmp_path / "logs") as services:
        services.start("worker", "worker", "--pool", "cpu", "--models", "fraud", "--concurrency", "1")
        # Given three jobs run by the worker's node
        job_ids = _submit(submitter, 3)
        views = _wait_succeeded(stores, job_ids)
        samples = _scrape(url)
        succeeded = {"model": "fraud", "status": "succeeded", "code": ""}
        assert _value(samples, "inferq_worker_jobs_total", **succeeded) == 3
        assert _value(samples, "inferq_batch_size_sum", model="fraud") == 3  # every job ran in exactly one batch
        assert _value(samples, "inferq_batch_size_count", model="fraud") >= 1
        assert _value(samples, "inferq_job_latency_seconds_count", model="fraud", status="succeeded") == 3
        assert _value(samples, "inferq_job_queue_seconds_count", model="fraud") == 3
        assert _value(samples, "inferq_worker_claims_total", model="fraud", redelivered="false") == 3
        _assert_no_job_ids(samples, job_ids)
        # When the node is killed outright, and the supervisor starts another one that runs one more job
        node_pid = int(stores.text.hget(f"inferq:job:{job_ids[0]}", "worker_pid") or 0)
        assert node_pid > 0
        os.kill(node_pid, signal.SIGKILL)
        # (a message sent while the dead node's BRPOP is still open would be lost to it: the reconciler's case,
        # and there is no reconciler here, so wait for the new node first)
        deadline = time.monotonic() + _TIMEOUT_S
        while services.log_of("worker").count("ready: models fraud") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        [after] = _wait_succeeded(stores, _submit(submitter, 1))
        # Then the dead node's counts are still in the sum, next to the new node's
        assert _value(_scrape(url), "inferq_worker_jobs_total", **succeeded) == 4
        assert stores.text.hget(f"inferq:job:{after['job_id']}", "worker_pid") != str(node_pid)
        assert len(views) == 3 and "inferq worker: node" in services.log_of("worker")
    celery_app.close()
    stores.text.close()
