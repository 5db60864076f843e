"""Scheduling order, seen from the job records: jobs queued while no worker runs, then one worker with a single
slot, so that the order in which it claims them (their `started_at`) is the order the broker hands them out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferq.config import Settings
from inferq.producers.stack import ServiceStack
from inferq.producers.submit import JobSubmitter, SubmitOptions
from inferq.protocol.celery_config import build_celery
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.fairness import tenant_buckets
from inferq.protocol.intake import TensorUpload
from inferq.protocol.priority import Priority
from inferq.protocol.registry import load_registry
from inferq.workers.supervisor import celery_worker_argv

_BUCKETS = 4
_FINISH_TIMEOUT_S = 180.0


def _tenants_in_two_buckets() -> tuple[str, str]:
    first = "north"
    other = next(
        f"south-{n}"
        for n in range(100)
        if tenant_buckets(f"south-{n}", buckets=_BUCKETS) != tenant_buckets(first, buckets=_BUCKETS)
    )
    return first, other


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, tenant_buckets=_BUCKETS)


@pytest.fixture
def stores(settings: Settings) -> Iterator[Stores]:
    stores = open_stores(settings.redis_url_or_default, queued_ttl_s=3600, result_ttl_s=600)
    yield stores
    stores.text.close()


@pytest.fixture
def submitter(settings: Settings, stores: Stores) -> JobSubmitter:
    registry = load_registry(settings.registry_path)
    return JobSubmitter(
        settings=settings, registry=registry, stores=stores, celery_app=build_celery(settings, registry)
    )


def _submit(submitter: JobSubmitter, tenant: str, priority: str = "routine", deadline_s: float | None = None) -> str:
    upload = TensorUpload(inputs=[TensorPayload(name="transactions", shape=[1, 30], datatype="FP32", data=[0.0] * 30)])
    options = SubmitOptions(priority=Priority(priority), tenant=tenant, deadline_s=deadline_s)
    return submitter.submit("fraud", upload, options).job_id


def _run_one_slot_worker(settings: Settings, tmp_path: Path, job_ids: list[str], stores: Stores) -> None:
    """A plain `celery worker -Q fraud` with one thread: it must take the tenant sub-queues too."""
    env = {**os.environ, "INFERQ_REDIS_URL": settings.redis_url_or_default, "INFERQ_TENANT_BUCKETS": str(_BUCKETS)}
    env["INFERQ_TORCH_THREADS"] = "1"
    argv = celery_worker_argv(["fraud"], f"order-{os.getpid()}@%h", slots=1, loglevel="info")
    with ServiceStack(env, tmp_path / "logs") as services:
        services.start_command("worker", argv)
        deadline_s = time.monotonic() + _FINISH_TIMEOUT_S
        while time.monotonic() < deadline_s:
            views = stores.jobs.views(job_ids)
            if all(v is not None and v["status"] == "succeeded" for v in views):
                return
            assert not services.dead(), services.log_of("worker")[-4000:]
            time.sleep(0.2)
        pytest.fail("the worker did not finish the jobs:\n" + services.log_of("worker")[-4000:])


def _claim_order(stores: Stores, job_ids: list[str]) -> list[str]:
    started = {job_id: float(stores.jobs.fields(job_id)["started_at"]) for job_id in job_ids}
    return sorted(job_ids, key=started.__getitem__)


def test_a_single_slot_worker_takes_stat_then_urgent_then_deadlines_and_tenants_take_turns(
    submitter: JobSubmitter, stores: Stores, settings: Settings, tmp_path: Path
) -> None:
    # Given, with no worker running: a flood of routine jobs from one tenant, a few from another, then a routine job
    # due within a minute, an urgent job and a STAT job, in that order
    north, south = _tenants_in_two_buckets()
    flood = [_submit(submitter, north) for _ in range(6)]
    few = [_submit(submitter, south) for _ in range(3)]
    due_soon = _submit(submitter, north, deadline_s=50.0)
    urgent = _submit(submitter, south, "urgent")
    stat = _submit(submitter, north, "stat")
    everything = [*flood, *few, due_soon, urgent, stat]
    assert stores.jobs.model_queue_depths(["fraud"]) == {"fraud": len(everything)}
    # When one worker with one slot starts
    _run_one_slot_worker(settings, tmp_path, everything, stores)
    order = _claim_order(stores, everything)
    # Then STAT first, urgent next, then the routine job due soonest, then the two tenants in turn
    assert order[:3] == [stat, urgent, due_soon]
    tenants = ["n" if job_id in flood else "s" for job_id in order[3:]]
    assert sorted(tenants[:6]) == ["n", "n", "n", "s", "s", "s"], tenants
    assert tenants[6:] == ["n", "n", "n"]
    # and within each tenant, first in, first out
    assert [j for j in order if j in flood] == flood and [j for j in order if j in few] == few
    assert {stores.jobs.fields(j)["priority"] for j in flood} == {"routine"}
