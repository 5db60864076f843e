"""The HTTP API: submit jobs, poll them, cancel them, list models. Every error is `{"error": {code, message,
retryable}}` with a 4xx or 503 status; no stack trace and no patient data ever reaches a client."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import Settings
from producers.bulk import JobsQuery, outcomes_of, read_file_items, read_json_body, read_tensor_items
from producers.submit import JobSubmitter, Receipt, SubmitItem, SubmitOptions
from producers.waiting import CompletionHub, is_final, prefer_wait_s, wait_for_jobs
from protocol.celery_config import build_celery
from protocol.codec import TensorPayload
from protocol.connections import Stores, open_stores
from protocol.errors import (
    BackendUnavailable,
    InferqError,
    InvalidRequest,
    PayloadTooLarge,
    QueueFull,
    UnknownJob,
    error_payload,
)
from protocol.intake import FileUpload, TensorUpload
from protocol.registry import Registry, load_registry

log = logging.getLogger(__name__)

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]


class ErrorBody(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorResponse(BaseModel):
    error: ErrorBody


class TensorJobRequest(BaseModel):
    """A tensor job in the Open Inference Protocol (KServe v2) form, plus inferq's job options."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorPayload] = Field(min_length=1)
    callback_url: str | None = None
    priority: int = 0
    idempotency_key: str | None = None
    parameters: dict[str, Any] | None = None


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatusName
    status_url: str


class JobView(BaseModel):
    job_id: str
    model: str | None
    model_version: str | None
    status: JobStatusName
    submitted_at: str | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    result: dict[str, Any] | None
    error: ErrorBody | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 409, 413, 415, 422, 429, 503)
}
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "DICOM, PNG or JPEG"},
                        "callback_url": {"type": "string"},
                        "priority": {"type": "integer", "minimum": 0, "maximum": 9},
                        "idempotency_key": {"type": "string"},
                    },
                }
            },
            "application/json": {
                "schema": TensorJobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            },
        },
    }
}


@dataclass
class ApiState:
    settings: Settings
    registry: Registry
    stores: Stores
    submitter: JobSubmitter
    hub: CompletionHub

    async def read_jobs(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        return await run_in_threadpool(self.stores.jobs.views, job_ids)

    async def wait_jobs(self, job_ids: list[str], wait_s: float, until: Literal["all", "any"] = "all") -> list[Any]:
        capped_s = min(wait_s, self.settings.max_wait_s)
        return await wait_for_jobs(self.hub, self.read_jobs, job_ids, wait_s=capped_s, until=until)


def _error_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": payload}, headers=headers)


def _retry_after(exc: InferqError, settings: Settings) -> dict[str, str] | None:
    """RFC 9110 `Retry-After` (seconds) on a refusal that a later retry may overcome."""
    if isinstance(exc, QueueFull):
        return {"Retry-After": str(settings.queue_full_retry_after_s)}
    if exc.http_status == 503:
        return {"Retry-After": str(settings.unavailable_retry_after_s)}
    return None


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(InferqError)
    async def _inferq_error(_: Request, exc: InferqError) -> JSONResponse:
        return _error_response(exc.http_status, exc.to_dict(), _retry_after(exc, settings))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, InvalidRequest(_describe_validation(exc.errors())).to_dict())

    @app.exception_handler(redis.RedisError)
    async def _redis_error(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error: %s", type(exc).__name__)
        unavailable = BackendUnavailable("the job store is unavailable; try again")
        return _error_response(503, unavailable.to_dict(), _retry_after(unavailable, settings))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, {"code": code, "message": str(exc.detail), "retryable": False})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s in the API", type(exc).__name__)
        return _error_response(500, error_payload(exc))


def _describe_validation(errors: Any) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in list(errors)[:5]]
    return "invalid request: " + "; ".join(parts)


_RAW_IMAGE_TYPES = ("application/dicom", "image/png", "image/jpeg")


async def _read_raw_image(request: Request, settings: Settings) -> tuple[FileUpload, dict[str, Any]]:
    """A bare image body (`Content-Type: application/dicom`, `image/png`, `image/jpeg`); options from the query."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes")
    return FileUpload(data=bytes(data)), dict(request.query_params)


async def _read_upload(request: Request, settings: Settings) -> tuple[FileUpload, dict[str, Any]]:
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("a multipart upload needs its file in the field 'file'")
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes")
    fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
    return FileUpload(data=data, filename=upload.filename or ""), fields


async def _read_tensor_json(request: Request) -> tuple[TensorUpload, dict[str, Any]]:
    try:
        body = TensorJobRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise InvalidRequest(_describe_validation(e.errors())) from e
    options = {"callback_url": body.callback_url, "priority": body.priority, "idempotency_key": body.idempotency_key}
    return TensorUpload(inputs=body.inputs), options


def _options(fields: dict[str, Any], header_key: str | None) -> SubmitOptions:
    priority = fields.get("priority")
    try:
        priority_value = int(priority) if priority not in (None, "") else 0
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"priority must be an integer 0..9, got {priority!r}") from e
    key = fields.get("idempotency_key") or header_key
    return SubmitOptions(callback_url=fields.get("callback_url") or None, priority=priority_value, idempotency_key=key)


def _check_length(request: Request, settings: Settings) -> None:
    length = request.headers.get("content-length")
    # Multipart framing adds a little; refuse early only what cannot fit by any measure.
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes")


def _register_job_routes(app: FastAPI, state: ApiState) -> None:
    @app.post(
        "/v1/models/{model}/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses=_ERRORS,
        openapi_extra=_SUBMIT_BODY,
        summary="Submit a job: a file upload (image models) or OIP tensors as JSON (tensor models)",
    )
    async def submit_job(
        model: str,
        request: Request,
        idempotency_key: str | None = Header(default=None),
        prefer: str | None = Header(
            default=None, description="RFC 7240 `wait=N`: answer 200 with the job if it ends within N seconds"
        ),
    ) -> JSONResponse:
        state.registry.get_model(model)
        _check_length(request, state.settings)
        content_type = request.headers.get("content-type", "")
        upload: FileUpload | TensorUpload
        if content_type.startswith("multipart/form-data"):
            upload, fields = await _read_upload(request, state.settings)
        elif content_type.startswith("application/json"):
            upload, fields = await _read_tensor_json(request)
        elif content_type.startswith(_RAW_IMAGE_TYPES):
            upload, fields = await _read_raw_image(request, state.settings)
        else:
            raise InvalidRequest(
                "send multipart/form-data with a 'file' field, a bare application/dicom, image/png or image/jpeg "
                "body, or application/json with 'inputs'"
            )
        receipt = await run_in_threadpool(state.submitter.submit, model, upload, _options(fields, idempotency_key))
        return await _accepted(state, request, receipt, prefer_wait_s(prefer))

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, name="get_job")
    async def get_job(
        job_id: str,
        wait_s: float = Query(default=0.0, ge=0, description="Wait up to this long (capped) for the job to end"),
    ) -> dict[str, Any]:
        [view] = await state.wait_jobs([job_id], wait_s)
        if view is None:
            raise UnknownJob(f"no job with id {job_id!r}")
        return dict(view)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, summary="Cancel a queued job")
    def cancel_job(job_id: str) -> dict[str, Any]:
        state.stores.jobs.cancel(job_id)
        return state.stores.jobs.view(job_id)


async def _accepted(state: ApiState, request: Request, receipt: Receipt, wait_s: float | None) -> JSONResponse:
    """202 with the job's address; with `Prefer: wait=N`, 200 with the job itself when it ends within N s."""
    status_url = str(request.url_for("get_job", job_id=receipt.job_id))
    headers = {"Location": status_url}
    if receipt.replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is not None:
        capped_s = min(wait_s, state.settings.max_wait_s)
        headers["Preference-Applied"] = f"wait={capped_s:g}"
        [view] = await state.wait_jobs([receipt.job_id], capped_s)
        if view is not None and is_final(view):
            return JSONResponse(status_code=200, content=view, headers={**headers, "Content-Location": status_url})
    accepted = JobAccepted(job_id=receipt.job_id, status=receipt.status, status_url=status_url)  # type: ignore[arg-type]
    return JSONResponse(status_code=202, content=accepted.model_dump(), headers=headers)


def _register_bulk_routes(app: FastAPI, state: ApiState) -> None:
    @app.post(
        "/v1/models/{model}/jobs/bulk",
        responses=_ERRORS,
        summary="Submit many jobs at once: JSON {'jobs': [...]} (tensor models) or several 'file' parts (image models)",
    )
    async def submit_bulk(
        model: str, request: Request, idempotency_key: str | None = Header(default=None)
    ) -> dict[str, Any]:
        state.registry.get_model(model)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            items = await read_file_items(request, state.settings, idempotency_key)
        elif content_type.startswith("application/json"):
            items = read_tensor_items(await read_json_body(request, state.settings), state.settings, idempotency_key)
        else:
            raise InvalidRequest("send application/json with 'jobs', or multipart/form-data with 'file' parts")
        readable = [item for item in items if isinstance(item, SubmitItem)]
        submitted = await run_in_threadpool(state.submitter.submit_many, model, readable) if readable else []
        jobs = [_bulk_entry(request, outcome) for outcome in outcomes_of(items, submitted)]
        accepted = sum("job_id" in job for job in jobs)
        return {"accepted": accepted, "rejected": len(jobs) - accepted, "jobs": jobs}

    @app.post("/v1/jobs/query", responses=_ERRORS, summary="Many jobs' states, waiting until all (or any) end")
    async def query_jobs(query: JobsQuery) -> dict[str, Any]:
        if len(query.job_ids) > state.settings.max_bulk_jobs:
            raise InvalidRequest(f"a query holds at most {state.settings.max_bulk_jobs} job ids")
        views = await state.wait_jobs(query.job_ids, query.wait_s, query.until)
        jobs = [
            view or {"job_id": job_id, "error": UnknownJob("no such job").to_dict()}
            for job_id, view in zip(query.job_ids, views, strict=True)
        ]
        return {"pending": sum(not is_final(view) for view in views), "jobs": jobs}


def _bulk_entry(request: Request, outcome: Receipt | InferqError) -> dict[str, Any]:
    if isinstance(outcome, InferqError):
        return {"error": outcome.to_dict()}
    status_url = str(request.url_for("get_job", job_id=outcome.job_id))
    return {"job_id": outcome.job_id, "status": outcome.status, "status_url": status_url, "replayed": outcome.replayed}


def _register_model_routes(app: FastAPI, state: ApiState) -> None:
    @app.get("/v1/models", summary="The model registry, with each model's queue depth")
    def list_models() -> dict[str, Any]:
        depths = state.submitter.queue_depths()
        return {"models": [{**spec.metadata(), "queue_depth": depths[name]} for name, spec in state.registry.items()]}

    @app.get("/v1/models/{model}", responses=_ERRORS)
    def get_model(model: str) -> dict[str, Any]:
        spec = state.registry.get_model(model)
        return {**spec.metadata(), "queue_depth": state.submitter.queue_depths()[model]}


def _register_health_routes(app: FastAPI, state: ApiState) -> None:
    @app.get("/healthz", summary="The API process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready only when Redis answers", responses={503: {"model": ErrorResponse}})
    def readyz() -> dict[str, str]:
        try:
            state.stores.text.ping()
        except redis.RedisError as e:
            raise BackendUnavailable("Redis does not answer") from e
        return {"status": "ready"}


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = registry or load_registry(settings.registry_path)
    stores = open_stores(
        settings.redis_url_or_default, queued_ttl_s=settings.queued_ttl_s, result_ttl_s=settings.result_ttl_s
    )
    celery_app = build_celery(settings, registry)
    submitter = JobSubmitter(settings=settings, registry=registry, stores=stores, celery_app=celery_app)
    hub = CompletionHub(settings.redis_url_or_default)
    state = ApiState(settings=settings, registry=registry, stores=stores, submitter=submitter, hub=hub)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await hub.start()
        yield
        await hub.stop()
        celery_app.close()
        stores.text.close()

    app = FastAPI(
        title="inferq",
        version="0.1.0",
        description="Asynchronous inference jobs on Celery and Redis. Models marked trained=false are untrained.",
        lifespan=lifespan,
    )
    _install_error_handlers(app, settings)
    _register_job_routes(app, state)
    _register_bulk_routes(app, state)
    _register_model_routes(app, state)
    _register_health_routes(app, state)
    return app
