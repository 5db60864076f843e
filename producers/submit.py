"""The one submission path: every intake (HTTP upload, tensor JSON, later DICOM C-STORE and STOW-RS) calls
`JobSubmitter.submit`. It validates the input against the model, keeps the original upload as a blob, writes
the job record, then sends the Celery task by name with only the job id and the blob reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from config import Settings
from protocol.connections import Stores
from protocol.errors import BackendUnavailable, InvalidRequest
from protocol.intake import FileUpload, TensorUpload, ValidatedInput, validate_input
from protocol.jobs import JobStatus, new_job_id
from protocol.keys import idempotency_token, queue_lists, task_name_for
from protocol.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

MAX_PRIORITY = 9
_MAX_IDEMPOTENCY_KEY_CHARS = 200
_MAX_CALLBACK_URL_CHARS = 2048


@dataclass(frozen=True, kw_only=True)
class SubmitOptions:
    """Stored with the job now; later issues give them their full behaviour."""

    callback_url: str | None = None
    priority: int = 0
    idempotency_key: str | None = None
    # The submitting key's tenant: stored on the job, and part of the idempotency key's hash.
    tenant: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise InvalidRequest(f"priority must be 0..{MAX_PRIORITY}, got {self.priority}")
        if self.callback_url is not None and (
            not self.callback_url.startswith(("http://", "https://"))
            or len(self.callback_url) > _MAX_CALLBACK_URL_CHARS
        ):
            raise InvalidRequest("callback_url must be an http(s) URL of at most 2048 characters")
        key = self.idempotency_key
        if key is not None and not (0 < len(key) <= _MAX_IDEMPOTENCY_KEY_CHARS and key.isprintable()):
            raise InvalidRequest(f"idempotency_key must be 1..{_MAX_IDEMPOTENCY_KEY_CHARS} printable characters")


@dataclass(frozen=True)
class Receipt:
    job_id: str
    status: str
    replayed: bool


class JobSubmitter:
    """Validates, stores and enqueues jobs; the API, the CLI and future intakes all go through here."""

    def __init__(self, *, settings: Settings, registry: Registry, stores: Stores, celery_app: Celery) -> None:
        self._settings = settings
        self._registry = registry
        self._stores = stores
        self._celery = celery_app

    def submit(self, model: str, upload: FileUpload | TensorUpload, options: SubmitOptions) -> Receipt:
        spec = self._registry.get_model(model)
        validated = validate_input(spec, upload, self._settings)
        try:
            return self._store_and_send(spec, validated, options)
        except (redis.RedisError, OperationalError) as e:
            raise BackendUnavailable("the job store or broker is unavailable; try again") from e

    def _store_and_send(self, spec: ModelSpec, validated: ValidatedInput, options: SubmitOptions) -> Receipt:
        keep_ttl_s = self._settings.queued_ttl_s + self._settings.result_ttl_s
        blob_ref = self._stores.blobs.put(validated.blob, ttl_s=keep_ttl_s)
        job_id = new_job_id()
        fields = {
            "model": spec.name,
            "model_version": spec.version,
            "blob_ref": blob_ref,
            "priority": str(options.priority),
            "callback_url": options.callback_url or "",
            "input_kind": validated.input_kind,
            "media_type": validated.media_type,
            "tenant": options.tenant,
        }
        # Only a hash of the client's idempotency key is kept: the key itself may be an accession number.
        idempotency = (
            idempotency_token(options.tenant, spec.name, options.idempotency_key) if options.idempotency_key else None
        )
        stored_id = self._stores.jobs.create(job_id, fields, idempotency=idempotency)
        if stored_id != job_id:
            self._stores.blobs.delete(blob_ref)
            status = self._stores.jobs.fields(stored_id)["status"]
            return Receipt(job_id=stored_id, status=status, replayed=True)
        self._send(spec, job_id, blob_ref)
        return Receipt(job_id=job_id, status=JobStatus.QUEUED.value, replayed=False)

    def _send(self, spec: ModelSpec, job_id: str, blob_ref: str) -> None:
        try:
            # By name: producers never import worker code. The job id doubles as the task id for Flower.
            self._celery.send_task(task_name_for(spec.name), args=[job_id, blob_ref], task_id=job_id)
        except Exception as e:
            log.warning("enqueue failed for job %s: %s", job_id, type(e).__name__)
            error = BackendUnavailable("the broker refused the job; submit it again").to_dict()
            self._stores.jobs.fail_unsent(job_id, blob_ref, error)
            raise BackendUnavailable("the broker is unavailable; try again") from e

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per model, summed over kombu's priority lists."""
        lists = {model: queue_lists(spec.queue_name) for model, spec in self._registry.items()}
        pipe = self._stores.text.pipeline()
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        counts = iter(pipe.execute())
        return {model: sum(next(counts) for _ in names) for model, names in lists.items()}
