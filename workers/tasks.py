"""The Celery tasks: one per model, named after it, thin. claim → decode → batch → record lives in `execute_job`.

A task never raises into Celery: every outcome is written to the job record (or, when the record cannot be
reached, left to the lease to lapse so that the reconciler runs the job again). Celery's own retry and result
backend are not used: the job record is the source of truth, and a retry is a fresh publish by the reconciler
once the backoff has passed.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from celery import Celery

from inferq.protocol.errors import (
    BackendUnavailable,
    BlobMissing,
    InferenceError,
    InferqError,
    TimeLimitExceeded,
)
from inferq.protocol.jobs import Claim, JobStatus, Outcome
from inferq.protocol.keys import many_task_name_for, prep_task_name_for, task_name_for
from inferq.protocol.metrics import record_claim, record_outcome
from inferq.protocol.priority import stored_priority
from inferq.protocol.registry import ModelSpec, Registry
from inferq.workers.batcher import BatchOutput, Fenced, Submission
from inferq.workers.handoff import pack, unpack
from inferq.workers.inference import build_result, prepare_input
from inferq.workers.metrics import record_gpu_memory
from inferq.workers.runtime import WorkerRuntime, retry_backoff_s

log = logging.getLogger(__name__)

# An attempt's outcome to record: job id, claim, final status, result or error payload, jobs in its batch.
_Attempt = tuple[str, Claim, JobStatus, dict[str, Any], int]

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, BackendUnavailable)


def execute_job(
    runtime: WorkerRuntime, model: str, job_id: str, blob_ref: str, *, prepared: bool = False
) -> dict[str, Any]:
    """Run one attempt of a job and record its outcome; returns a summary for Celery's logs and Flower.
    `prepared`: the blob is the input a separate decoding stage already made (see `execute_prep`)."""
    return _claimed(
        runtime,
        model,
        job_id,
        blob_ref,
        lambda spec, claim, blob: _attempt(runtime, spec, job_id, claim, blob, prepared=prepared),
    )


def execute_jobs(runtime: WorkerRuntime, model: str, job_ids: list[str], blob_refs: list[str]) -> dict[str, Any]:
    """Run one attempt of each job of a bulk submission's chunk (one Celery message for up to a batch of jobs):
    claimed in one round trip, decoded, batched, their outcomes written in one round trip. Each job keeps its own
    record, lease, fencing token, time limit and retries: only the message is shared."""
    try:
        claims = runtime.claim_many(list(zip(job_ids, blob_refs, strict=True)))
    except _TRANSIENT as e:
        log.warning("%d jobs: job store unreachable at claim (%s)", len(job_ids), type(e).__name__)
        return {"jobs": len(job_ids), "status": {"unreachable": len(job_ids)}}
    spec = runtime.registry.get_model(model)
    summary: Counter[str] = Counter()
    held: list[tuple[str, Claim, bytes | None]] = []
    for job_id, (claim, blob) in zip(job_ids, claims, strict=True):
        if claim.claimed:
            record_claim(model, token=claim.token, queued_s=claim.queued_s)
            held.append((job_id, claim, blob))
        else:
            log.info("job %s not run: %s", job_id, claim.outcome)
            summary[claim.outcome] += 1
    with _holding(runtime, spec, [(job_id, claim) for job_id, claim, _ in held]):
        summary.update(_attempt_many(runtime, spec, held))
    return {"jobs": len(job_ids), "status": dict(summary)}


def execute_prep(runtime: WorkerRuntime, model: str, job_id: str, blob_ref: str) -> dict[str, Any]:
    """The decoding stage of a model whose preprocessing runs apart: decode, store the tensor, hand the job over
    to the model's queue. A bad input fails its job here, so it never reaches the model's workers."""
    return _claimed(
        runtime, model, job_id, blob_ref, lambda spec, claim, blob: _prep(runtime, spec, job_id, claim, blob)
    )


def _claimed(
    runtime: WorkerRuntime,
    model: str,
    job_id: str,
    blob_ref: str,
    work: Callable[[ModelSpec, Claim, bytes | None], dict[str, Any]],
) -> dict[str, Any]:
    """Claim the job (and fetch its blob), hold its lease while `work` runs, let it go after."""
    try:
        claim, blob = runtime.claim(job_id, blob_ref)
    except _TRANSIENT as e:
        # The record is out of reach: the message is acknowledged, the job stays where it was, and the reconciler
        # publishes it again (a queued job whose message is gone, or a running one whose lease lapses).
        log.warning("job %s: job store unreachable at claim (%s)", job_id, type(e).__name__)
        return {"job_id": job_id, "status": "unreachable"}
    if not claim.claimed:
        # Cancelled, expired, finished (a redelivered message), held by a live attempt, or unknown: nothing to run.
        log.info("job %s not run: %s", job_id, claim.outcome)
        return {"job_id": job_id, "status": claim.outcome}
    record_claim(model, token=claim.token, queued_s=claim.queued_s)
    spec = runtime.registry.get_model(model)
    with _holding(runtime, spec, [(job_id, claim)]):
        return work(spec, claim, blob)


@contextlib.contextmanager
def _holding(runtime: WorkerRuntime, spec: ModelSpec, attempts: list[tuple[str, Claim]]) -> Iterator[None]:
    """Hold the attempts' leases (renewed, time limits watched) while the work runs; let them go after. Meanwhile
    this node counts as busy: it lends no core to a neighbour (workers.core_share)."""
    keeper, cores = runtime.leases, runtime.cores
    if keeper is None:  # a runtime that was not started: no lease keeper runs
        yield
        return
    if cores is not None:
        cores.hold(len(attempts))
    for job_id, claim in attempts:
        keeper.hold(job_id, claim.token, spec.name, soft_limit_s=spec.time_limit_s, hard_limit_s=spec.hard_limit_s)
    try:
        yield
    finally:
        for job_id, _ in attempts:
            keeper.drop(job_id)
        if cores is not None:
            cores.release(len(attempts))


def _prep(runtime: WorkerRuntime, spec: ModelSpec, job_id: str, claim: Claim, blob: bytes | None) -> dict[str, Any]:
    started_s = time.monotonic()
    try:
        if blob is None:
            raise BlobMissing("the upload of this job is no longer stored")
        rows, info = prepare_input(spec, blob, max_image_pixels=runtime.settings.max_image_pixels)
    except Exception as e:
        status, payload, _ = _failure(job_id, e)
        return _record(runtime, spec, job_id, claim, status, payload, 0, started_s=started_s)
    tensor_ref = uuid.uuid4().hex
    jobs = runtime.stores.jobs
    try:
        runtime.stores.blobs.put_as(tensor_ref, pack(rows, info), ttl_s=jobs.keep_ttl_s)
        reply = jobs.hand_off(job_id, claim.token, tensor_ref=tensor_ref, image_info=None)
    except _TRANSIENT as e:
        return _release(runtime, job_id, claim, e)
    if reply != "ok":
        runtime.stores.blobs.delete(tensor_ref)
        log.info("job %s: decoded, but attempt %d was fenced off: %s", job_id, claim.token, reply)
        return {"job_id": job_id, "status": "fenced"}
    runtime.send_prepared(spec.name, job_id, tensor_ref, claim)
    return {"job_id": job_id, "status": "decoded"}


def _attempt(
    runtime: WorkerRuntime, spec: ModelSpec, job_id: str, claim: Claim, blob: bytes | None, *, prepared: bool
) -> dict[str, Any]:
    [result] = _attempts(runtime, spec, [(job_id, claim, blob)], prepared=prepared)
    return result


def _attempt_many(runtime: WorkerRuntime, spec: ModelSpec, held: list[tuple[str, Claim, bytes | None]]) -> Counter[str]:
    return Counter(str(result["status"]) for result in _attempts(runtime, spec, held, prepared=False))


def _attempts(
    runtime: WorkerRuntime, spec: ModelSpec, held: list[tuple[str, Claim, bytes | None]], *, prepared: bool
) -> list[dict[str, Any]]:
    """Run claimed attempts (one job, or a chunk's): all handed to the batcher before any is awaited, so that they
    share forward passes; the outcomes are written in one round trip. A summary per job for Celery's logs."""
    started_s = time.monotonic()
    batcher = runtime.batcher(spec.name)
    for rank, count in Counter(_rank(claim) for _, claim, _ in held).items():
        batcher.expect(rank, count)  # the batcher waits for a whole chunk rather than run its first job alone
    submitted = [(job_id, claim, _decode(runtime, spec, job_id, claim, blob, prepared)) for job_id, claim, blob in held]
    ready = [(pending, pending.submission) for _, _, pending in submitted if pending.submission is not None]
    # One hand-over for the chunk: one wake-up of the batcher thread, not one per job.
    futures = batcher.submit_many([submission for _, submission in ready])
    for (pending, _), future in zip(ready, futures, strict=True):
        pending.future = future
    results: list[dict[str, Any]] = []
    outcomes: list[_Attempt] = []
    for job_id, claim, pending in submitted:
        try:
            outcomes.append((job_id, claim, *_await(spec, pending, started_s)))
        except Fenced:
            log.info("job %s: attempt %d was fenced off (cancelled, timed out or taken over)", job_id, claim.token)
            results.append({"job_id": job_id, "status": "fenced"})
        except _TRANSIENT as e:
            results.append(_release(runtime, job_id, claim, e))
    return results + _record_many(runtime, spec, outcomes, started_s=started_s)


def _record(
    runtime: WorkerRuntime,
    spec: ModelSpec,
    job_id: str,
    claim: Claim,
    status: JobStatus,
    payload: dict[str, Any],
    batch_jobs: int,
    *,
    started_s: float,
) -> dict[str, Any]:
    """Write the attempt's outcome, if the attempt still owns its job."""
    [result] = _record_many(runtime, spec, [(job_id, claim, status, payload, batch_jobs)], started_s=started_s)
    return result


def _record_many(
    runtime: WorkerRuntime,
    spec: ModelSpec,
    attempts: list[_Attempt],
    *,
    started_s: float,
) -> list[dict[str, Any]]:
    """Write the outcomes of attempts in one round trip; each is written only if its attempt still owns its job."""
    outcomes = [
        Outcome(
            job_id,
            claim.token,
            status,
            result=payload if status == JobStatus.SUCCEEDED else None,
            error=payload if status == JobStatus.FAILED else None,
            batch_size=batch_jobs,
        )
        for job_id, claim, status, payload, batch_jobs in attempts
    ]
    if not outcomes:
        return []
    try:
        replies = runtime.stores.jobs.finish(outcomes)
    except _TRANSIENT as e:
        log.warning("%d job(s): could not record outcomes (%s); they will run again", len(outcomes), type(e).__name__)
        return [{"job_id": job_id, "status": "unrecorded"} for job_id, *_ in attempts]
    compute_s = time.monotonic() - started_s
    results = []
    recorded: dict[str, list[str]] = {}
    for (job_id, claim, status, payload, batch_jobs), reply in zip(attempts, replies, strict=True):
        if reply == "ok:callback":
            runtime.send_callback(job_id)
        if reply.startswith("ok"):
            code = str((payload or {}).get("code", "")) if status == JobStatus.FAILED else ""
            record_outcome(spec.name, status.value, code, queued_s=claim.queued_s, compute_s=compute_s)
            recorded.setdefault(status.value, []).append(job_id)
        else:
            log.warning("job %s: outcome of attempt %d not recorded: %s", job_id, claim.token, reply)
        results.append({"job_id": job_id, "status": status.value, "batch_size": batch_jobs})
    _log_recorded(attempts, recorded)
    record_gpu_memory(runtime.device())
    return results


def _log_recorded(attempts: list[_Attempt], recorded: dict[str, list[str]]) -> None:
    """One line per job, or one per bulk chunk: a hundred lines for a millisecond's compute would cost the worker
    more than the jobs do. Either way each recorded job's id appears with its status."""
    if len(attempts) == 1 and recorded:
        job_id, claim, status, _, batch_jobs = attempts[0]
        log.info("job %s recorded %s (attempt %d, batch of %d)", job_id, status.value, claim.token, batch_jobs)
    elif recorded:
        batches = sorted({batch_jobs for *_, batch_jobs in attempts})
        listed = "; ".join(f"{status}: {' '.join(ids)}" for status, ids in recorded.items())
        log.info("chunk of %d jobs recorded (batches of %s): %s", len(attempts), batches, listed)


@dataclass
class _Pending:
    """A decoded job, to be handed to its batcher (`submission`) and then awaited (`future`), with what decoding
    learned of the input; or one already decided (`outcome`: a bad input)."""

    job_id: str
    submission: Submission | None = None
    future: Future[BatchOutput] | None = None
    info: Any = None
    outcome: tuple[JobStatus, dict[str, Any], int] | None = None


def _decode(
    runtime: WorkerRuntime, spec: ModelSpec, job_id: str, claim: Claim, blob: bytes | None, prepared: bool
) -> _Pending:
    """Decode here (unless a decoding stage did) into the rows for the model's batcher, which the caller told to
    `expect` the job; a bad input fails only this job."""
    try:
        if blob is None:
            raise BlobMissing("the upload of this job is no longer stored")
        rows, info = unpack(blob) if prepared else runtime.runner(spec.name).prepare(blob)
    except Exception as e:
        runtime.batcher(spec.name).unexpect(_rank(claim))
        return _Pending(job_id, outcome=_failure(job_id, e))
    submission = Submission(
        job_id,
        claim.token,
        _with_batch_axis(spec, rows),
        # A job that may have ended its worker before runs alone: it cannot take a batch of others down with it.
        isolate=claim.lost > 0,
        priority=_rank(claim),
        deadline_s=claim.deadline_at_s,
    )
    return _Pending(job_id, submission=submission, info=info)


def _await(spec: ModelSpec, pending: _Pending, started_s: float) -> tuple[JobStatus, dict[str, Any], int]:
    """The job's outcome once its batch ran; raises `Fenced` or a transient error for the caller's retry path."""
    if pending.future is None:
        assert pending.outcome is not None
        return pending.outcome
    try:
        output = pending.future.result()
    except (Fenced, *_TRANSIENT):
        raise
    except Exception as e:
        return _failure(pending.job_id, e)
    if time.monotonic() - started_s > spec.time_limit_s:
        # Past the soft limit before the watchdog looked: the same outcome as if it had.
        limit = TimeLimitExceeded(f"the job ran past its model's time limit of {spec.time_limit_s:g} s")
        return JobStatus.FAILED, limit.to_dict(), 0
    return JobStatus.SUCCEEDED, build_result(spec, output.rows, pending.info), output.batch_jobs


def _rank(claim: Claim) -> int:
    return stored_priority(claim.priority).rank


def _with_batch_axis(spec: ModelSpec, rows: np.ndarray) -> np.ndarray:
    return rows[np.newaxis] if spec.input.kind == "image" else rows


def _failure(job_id: str, exc: BaseException) -> tuple[JobStatus, dict[str, Any], int]:
    if isinstance(exc, InferqError):
        log.info("job %s failed: %s", job_id, exc.code)
        return JobStatus.FAILED, exc.to_dict(), 0
    # Messages of third-party exceptions may quote file contents: log the type and the frames only.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("job %s failed with unexpected %s\n%s", job_id, type(exc).__name__, frames)
    return JobStatus.FAILED, InferenceError("the model could not process this input").to_dict(), 0


def _release(runtime: WorkerRuntime, job_id: str, claim: Claim, exc: BaseException) -> dict[str, Any]:
    error = BackendUnavailable(f"a transient failure ({type(exc).__name__}); the job will run again").to_dict()
    try:
        backoff_s = retry_backoff_s(runtime.settings, claim.token)
        outcome = runtime.stores.jobs.release(job_id, claim.token, backoff_s=backoff_s, error=error)
    except _TRANSIENT:
        outcome = "unreachable"  # the lease will lapse and the reconciler will take it from there
    log.warning("job %s: transient %s on attempt %d: %s", job_id, type(exc).__name__, claim.token, outcome)
    return {"job_id": job_id, "status": "retrying", "outcome": outcome}


def _make_task(app: Celery, spec: ModelSpec, runtime: Callable[[], WorkerRuntime]) -> None:
    @app.task(name=task_name_for(spec.name), ignore_result=True)
    def infer(job_id: str, blob_ref: str, prepared: bool = False) -> dict[str, Any]:
        return execute_job(runtime(), spec.name, job_id, blob_ref, prepared=prepared)

    @app.task(name=many_task_name_for(spec.name), ignore_result=True)
    def infer_many(job_ids: list[str], blob_refs: list[str]) -> dict[str, Any]:
        return execute_jobs(runtime(), spec.name, job_ids, blob_refs)

    if spec.preprocess == "separate":

        @app.task(name=prep_task_name_for(spec.name), ignore_result=True)
        def prep(job_id: str, blob_ref: str) -> dict[str, Any]:
            return execute_prep(runtime(), spec.name, job_id, blob_ref)


def register_tasks(app: Celery, registry: Registry, runtime: Callable[[], WorkerRuntime]) -> None:
    for spec in registry.values():
        _make_task(app, spec, runtime)


__all__ = ["execute_job", "execute_jobs", "execute_prep", "register_tasks"]
