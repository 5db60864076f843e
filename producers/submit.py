"""The one submission path: every intake (HTTP upload, tensor JSON, bulk requests, later DICOM C-STORE and
STOW-RS) calls `JobSubmitter.submit_many` (`submit` is its one-job form). It validates each input against the
model, refuses load past the model's `max_queue_depth`, writes the blobs and job records in one pipeline, then
sends one Celery task per job by name with only the job id and the blob reference (a bulk submission's tensor jobs:
one task per chunk of up to `max_batch_size` jobs, each job still its own record).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from inferq.config import Settings
from inferq.protocol.celery_config import entry_queue, entry_task
from inferq.protocol.connections import Stores
from inferq.protocol.errors import BackendUnavailable, ClientError, InferqError, InvalidRequest, QueueFull
from inferq.protocol.fairness import publish_options
from inferq.protocol.intake import FileUpload, TensorUpload, ValidatedInput, validate_input
from inferq.protocol.jobs import QUEUE_FULL, JobStatus, NewJob, new_job_id
from inferq.protocol.keys import JOBS_HEADER, idempotency_token, many_task_name_for
from inferq.protocol.priority import DEFAULT_PRIORITY, Priority, parse_priority
from inferq.protocol.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

_MAX_IDEMPOTENCY_KEY_CHARS = 200
_MAX_CALLBACK_URL_CHARS = 2048
_MAX_DEADLINE_S = 7 * 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class SubmitOptions:
    """Stored with the job now; later issues give them their full behaviour."""

    callback_url: str | None = None
    # Taken first from the broker and in the batcher (protocol.priority); numbers 0..9 are read as an alias.
    priority: Priority = DEFAULT_PRIORITY
    idempotency_key: str | None = None
    # The submitting key's tenant: stored on the job, and part of the idempotency key's hash.
    tenant: str = ""
    # Not started within this many seconds: the job ends `expired` without costing compute.
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", parse_priority(self.priority))
        if self.callback_url is not None and (
            not self.callback_url.startswith(("http://", "https://"))
            or len(self.callback_url) > _MAX_CALLBACK_URL_CHARS
        ):
            raise InvalidRequest("callback_url must be an http(s) URL of at most 2048 characters")
        if self.deadline_s is not None and not 0 < self.deadline_s <= _MAX_DEADLINE_S:
            raise InvalidRequest(
                f"deadline_s must be more than 0 and at most {_MAX_DEADLINE_S:g}, got {self.deadline_s}"
            )
        key = self.idempotency_key
        if key is not None and not (0 < len(key) <= _MAX_IDEMPOTENCY_KEY_CHARS and key.isprintable()):
            raise InvalidRequest(f"idempotency_key must be 1..{_MAX_IDEMPOTENCY_KEY_CHARS} printable characters")


@dataclass(frozen=True)
class Receipt:
    job_id: str
    status: str
    replayed: bool


@dataclass(frozen=True)
class SubmitItem:
    """One job of a submission: its input and its options."""

    upload: FileUpload | TensorUpload
    options: SubmitOptions


Outcome = Receipt | InferqError


@dataclass(frozen=True)
class _Prepared:
    index: int
    job: NewJob


class JobSubmitter:
    """Validates, stores and enqueues jobs; the API, the CLI, bulk requests and future intakes all go through here."""

    def __init__(self, *, settings: Settings, registry: Registry, stores: Stores, celery_app: Celery) -> None:
        self._settings = settings
        self._registry = registry
        self._stores = stores
        self._celery = celery_app

    def submit(self, model: str, upload: FileUpload | TensorUpload, options: SubmitOptions) -> Receipt:
        """One job; raises its error (client error, `QueueFull`, `BackendUnavailable`) instead of returning it."""
        [outcome] = self.submit_many(model, [SubmitItem(upload, options)])
        if isinstance(outcome, InferqError):
            raise outcome
        return outcome

    def submit_many(self, model: str, items: Sequence[SubmitItem]) -> list[Outcome]:
        """Each item's receipt or its own error, in order: a bad item never fails the others. Raises
        `QueueFull` when the model's queue has no room at all, `BackendUnavailable` when Redis is down."""
        spec = self._registry.get_model(model)
        outcomes: list[Outcome | None] = [None] * len(items)
        valid: list[tuple[int, ValidatedInput]] = []
        for index, item in enumerate(items):
            try:
                valid.append((index, validate_input(spec, item.upload, self._settings)))
            except ClientError as e:
                outcomes[index] = e
        try:
            prepared = [self._prepare(spec, i, v, items[i].options) for i, v in valid]
            stored = self._store_and_send(spec, prepared) if prepared else []
        except (redis.RedisError, OperationalError) as e:
            raise BackendUnavailable("the job store or broker is unavailable; try again") from e
        if stored and all(isinstance(outcome, QueueFull) for outcome in stored):
            raise QueueFull(f"the queue of {spec.name!r} holds {spec.max_queue_depth} jobs or more; try again later")
        for p, outcome in zip(prepared, stored, strict=True):
            outcomes[p.index] = outcome
        return [o for o in outcomes if o is not None]

    def _prepare(self, spec: ModelSpec, index: int, validated: ValidatedInput, options: SubmitOptions) -> _Prepared:
        fields = {
            "model": spec.name,
            "model_version": spec.version,
            "blob_ref": uuid.uuid4().hex,
            "priority": options.priority.value,
            "callback_url": options.callback_url or "",
            "input_kind": validated.input_kind,
            "media_type": validated.media_type,
            "max_attempts": str(spec.max_attempts),
            "tenant": options.tenant,
        }
        if options.deadline_s is not None:
            # Marks the queue deadline as the client's own, which orders the job among those of its class.
            fields["deadline_s"] = f"{options.deadline_s:g}"
        # Only a hash of the client's idempotency key is kept: the key itself may be an accession number.
        idempotency = (
            idempotency_token(options.tenant, spec.name, options.idempotency_key) if options.idempotency_key else None
        )
        job = NewJob(
            job_id=new_job_id(), fields=fields, idempotency=idempotency, blob=validated.blob, queue_s=options.deadline_s
        )
        return _Prepared(index=index, job=job)

    def _store_and_send(self, spec: ModelSpec, prepared: list[_Prepared]) -> list[Outcome]:
        jobs = [p.job for p in prepared]
        keep_ttl_s = self._settings.queued_ttl_s + self._settings.result_ttl_s
        # The model's queue depth is checked as each record is created: a job past it is refused on its own.
        stored_ids = self._stores.jobs.create_many(
            jobs, blob_ttl_s=keep_ttl_s, max_queue_depth=spec.max_queue_depth or 0
        )
        replays = {s for job, s in zip(jobs, stored_ids, strict=True) if s not in (job.job_id, QUEUE_FULL)}
        replay_views = dict(zip(replays, self._stores.jobs.views(list(replays)), strict=True)) if replays else {}
        fresh = [job for job, s in zip(jobs, stored_ids, strict=True) if s == job.job_id]
        sent = self._send_all(spec, fresh)
        outcomes: list[Outcome] = []
        for job, stored_id in zip(jobs, stored_ids, strict=True):
            if stored_id == QUEUE_FULL:
                outcomes.append(QueueFull(f"the queue of {spec.name!r} is full; try again later"))
            elif stored_id in replay_views:
                view = replay_views[stored_id]
                status = view["status"] if view else JobStatus.QUEUED.value
                outcomes.append(Receipt(job_id=stored_id, status=status, replayed=True))
            else:
                outcomes.append(sent[job.job_id])
        return outcomes

    def _send_all(self, spec: ModelSpec, jobs: list[NewJob]) -> dict[str, Outcome]:
        """Publish the jobs, a chunk per message where they can share one; after the first refusal the broker is
        taken as down and the rest are not tried."""
        outcomes: dict[str, Outcome] = {}
        broker_up = True
        with self._celery.producer_or_acquire() as producer:
            for chunk in _chunks(spec, jobs):
                broker_up = broker_up and self._send(spec, chunk, producer)
                for job in chunk:
                    queued = Receipt(job_id=job.job_id, status=JobStatus.QUEUED.value, replayed=False)
                    outcomes[job.job_id] = queued if broker_up else self._unsent(job)
        return outcomes

    def _send(self, spec: ModelSpec, chunk: list[NewJob], producer: Any) -> bool:
        first = chunk[0]
        try:
            # By name: producers never import worker code. The job record holds the result, so Celery's result
            # backend is skipped: otherwise the producer subscribes to each task's result and, with the backend
            # down, retries that for ~20 s before failing.
            routing = publish_options(
                self._settings,
                entry_queue(spec),
                tenant=first.fields["tenant"],
                priority=Priority(first.fields["priority"]),
                remaining_s=first.queue_s or self._settings.queued_ttl_s,
            )
            if len(chunk) == 1:  # the job id doubles as the task id, for Flower
                args: list[Any] = [first.job_id, first.fields["blob_ref"]]
                task, task_id, headers = entry_task(spec), first.job_id, None
            else:
                args = [[job.job_id for job in chunk], [job.fields["blob_ref"] for job in chunk]]
                task, task_id, headers = many_task_name_for(spec.name), uuid.uuid4().hex, {JOBS_HEADER: args[0]}
            self._celery.send_task(
                task, args=args, task_id=task_id, producer=producer, ignore_result=True, headers=headers, **routing
            )
        except Exception as e:
            log.warning("enqueue failed for %d job(s), the first %s: %s", len(chunk), first.job_id, type(e).__name__)
            return False
        return True

    def _unsent(self, job: NewJob) -> Outcome:
        """A job the broker never took is removed (best effort), so that a retry with its idempotency key makes a
        fresh job instead of replaying a failure; a job a worker already claimed was published after all."""
        try:
            outcome = self._stores.jobs.discard_unsent(
                job.job_id, model=job.fields["model"], idempotency=job.idempotency
            )
        except redis.RedisError:
            log.warning("could not discard unsent job %s; it will expire", job.job_id)
            outcome = "discarded"
        if outcome != "discarded":
            return Receipt(job_id=job.job_id, status=outcome, replayed=False)
        return BackendUnavailable("the broker is unavailable; try again")


def _chunks(spec: ModelSpec, jobs: list[NewJob]) -> list[list[NewJob]]:
    """The messages to send: a bulk submission's jobs travel up to a batch per message, which saves the per-task
    cost of the broker and of Celery (the fraud model's forward pass is far cheaper than either). Only jobs with
    the same routing (tenant, priority, deadline) share one, and only for tensor inputs: an image's decoding costs
    far more than its message, and runs best spread over the worker's processes and threads."""
    if spec.input.kind != "tensor" or spec.preprocess == "separate" or spec.max_batch_size <= 1:
        return [[job] for job in jobs]
    chunks: list[list[NewJob]] = []
    for job in jobs:
        last = chunks[-1] if chunks else None
        if last is not None and len(last) < spec.max_batch_size and _routing_of(last[0]) == _routing_of(job):
            last.append(job)
        else:
            chunks.append([job])
    return chunks


def _routing_of(job: NewJob) -> tuple[str, str, float | None]:
    return job.fields["tenant"], job.fields["priority"], job.queue_s
