"""The Celery tasks: one per model, named after it, thin. decode → run → store lives in `execute_job`."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from protocol.celery_config import HARD_LIMIT_GRACE_S
from protocol.errors import BackendUnavailable, InferqError, TimeLimitExceeded, error_payload
from protocol.keys import task_name_for
from protocol.registry import ModelSpec, Registry
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

_EXPIRED_ERROR = {"code": "expired", "message": "the job waited longer than queued_ttl_s", "retryable": True}
# Redis hiccups are retried by Celery with backoff; the job record stays `running` and is claimed again.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, BackendUnavailable)
_MAX_RETRIES = 5


def execute_job(runtime: WorkerRuntime, model: str, job_id: str, blob_ref: str) -> dict[str, Any]:
    """Run one job and record its outcome. Never raises for a bad input or a failing model: the job fails."""
    jobs = runtime.stores.jobs
    claim = jobs.claim(job_id, _EXPIRED_ERROR)
    if claim != "claimed":
        # Cancelled, expired, already finished (a redelivered message) or unknown: nothing to run.
        log.info("job %s not run: %s", job_id, claim)
        return {"job_id": job_id, "status": claim}
    try:
        result = runtime.runner(model).run(runtime.stores.blobs.get(blob_ref))
    except _TRANSIENT:
        raise
    except SoftTimeLimitExceeded:
        limit_s = runtime.registry.get_model(model).time_limit_s
        return _failed(runtime, job_id, blob_ref, TimeLimitExceeded(f"the job ran past {limit_s} s"))
    except Exception as e:
        return _failed(runtime, job_id, blob_ref, e)
    jobs.succeed(job_id, blob_ref, result)
    return {"job_id": job_id, "status": "succeeded"}


def _failed(runtime: WorkerRuntime, job_id: str, blob_ref: str, exc: BaseException) -> dict[str, Any]:
    error = error_payload(exc)
    if not isinstance(exc, InferqError):
        # Messages of third-party exceptions may quote file contents: log the type and the frames only.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("job %s failed with unexpected %s\n%s", job_id, type(exc).__name__, frames)
    else:
        log.info("job %s failed: %s", job_id, error["code"])
    runtime.stores.jobs.fail(job_id, blob_ref, error)
    return {"job_id": job_id, "status": "failed", "code": error["code"]}


def _make_task(app: Celery, spec: ModelSpec, runtime: Callable[[], WorkerRuntime]) -> None:
    @app.task(
        name=task_name_for(spec.name),
        soft_time_limit=spec.time_limit_s,
        time_limit=spec.time_limit_s + HARD_LIMIT_GRACE_S,
        autoretry_for=_TRANSIENT,
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=_MAX_RETRIES,
    )
    def infer(job_id: str, blob_ref: str) -> dict[str, Any]:
        return execute_job(runtime(), spec.name, job_id, blob_ref)


def register_tasks(app: Celery, registry: Registry, runtime: Callable[[], WorkerRuntime]) -> None:
    for spec in registry.values():
        _make_task(app, spec, runtime)
