"""The HTTP API: submit jobs, poll them, cancel them, list models. Every error is `{"error": {code, message,
retryable}}` with a 4xx or 503 status; no stack trace and no patient data ever reaches a client.

Every route but the health probes needs an API key (`producers.auth`); bodies are read under the size limit
(`producers.bodies`); each request leaves one line in the access log (`producers.access_log`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
import redis
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferq.config import Settings
from inferq.producers.access_log import AccessLogMiddleware
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.auth import Reader, Submitter, require_own_job
from inferq.producers.bodies import check_declared_length, parse_json, read_body, read_multipart
from inferq.producers.bulk import JobsQuery, outcomes_of, read_file_items, read_json_body, read_tensor_items
from inferq.producers.metrics import ApiProcessCollector, ClusterCollector, api_metrics_registry
from inferq.producers.readiness import consumers_per_model, served_models
from inferq.producers.submit import JobSubmitter, Receipt, SubmitItem, SubmitOptions
from inferq.producers.waiting import CompletionHub, is_final, prefer_wait_s, wait_for_jobs
from inferq.protocol.bare_images import MEDIA_TYPES, OPTION_HEADERS
from inferq.protocol.celery_config import build_celery
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import Stores, stores_for
from inferq.protocol.errors import (
    BackendUnavailable,
    ClientError,
    InferqError,
    InvalidRequest,
    NoConsumer,
    OptionsInQuery,
    Overloaded,
    PayloadTooLarge,
    QueueFull,
    Unauthorized,
    UnknownJob,
    error_payload,
)
from inferq.protocol.intake import FileUpload, TensorUpload
from inferq.protocol.logs import bind_context
from inferq.protocol.priority import PRIORITY_HELP, parse_priority
from inferq.protocol.registry import Registry, load_registry

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
    priority: str | int = Field(default="routine", description=PRIORITY_HELP)
    idempotency_key: str | None = None
    deadline_s: float | None = Field(default=None, gt=0, description="Not started by then: `expired`, no compute.")
    parameters: dict[str, Any] | None = None


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatusName
    status_url: str


class CallbackView(BaseModel):
    state: Literal["waiting", "pending", "delivered", "failed"]
    attempts: int
    last: str | None
    delivered_at: str | None


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
    batch_size: int | None = Field(default=None, description="Jobs in the forward pass that ran this one.")
    callback: CallbackView | None = Field(default=None, description="Present when the job has a callback_url.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
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
                        "priority": {
                            "type": "string",
                            "enum": ["stat", "urgent", "routine"],
                            "description": PRIORITY_HELP,
                        },
                        "deadline_s": {"type": "number", "exclusiveMinimum": 0},
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
    # Probing an upload may inflate a deflated DICOM: few at once, so many large uploads cannot exhaust memory.
    probe_limiter: anyio.CapacityLimiter
    hub: CompletionHub

    async def wait_jobs(
        self, job_ids: list[str], wait_s: float, until: Literal["all", "any"] = "all", *, tenant: str | None = None
    ) -> list[Any]:
        """The jobs once all (or any) are final, or after `wait_s` (capped); given `tenant`, another tenant's job
        reads None, as an unknown one does."""
        capped_s = min(wait_s, self.settings.max_wait_s)

        async def read(ids: list[str]) -> list[dict[str, Any] | None]:
            return await run_in_threadpool(functools.partial(self.stores.jobs.views, ids, tenant=tenant))

        return await wait_for_jobs(self.hub, read, job_ids, wait_s=capped_s, until=until)


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
        headers = dict(_retry_after(exc, settings) or {})
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return _error_response(exc.http_status, exc.to_dict(), headers or None)

    @app.exception_handler(MemoryError)
    async def _out_of_memory(_: Request, exc: MemoryError) -> JSONResponse:
        log.warning("out of memory while handling a request; answered 503")
        return _error_response(503, Overloaded("the service is short of memory; send the request again").to_dict())

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

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return await _unexpected(request, exc)
        log.warning("out of open files while handling a request; answered 503")
        overloaded = Overloaded("the service is short of open files; send the request again")
        return _error_response(503, overloaded.to_dict(), _retry_after(overloaded, settings))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s in the API", type(exc).__name__)
        return _error_response(500, error_payload(exc))


def _describe_validation(errors: Any) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in list(errors)[:5]]
    return "invalid request: " + "; ".join(parts)


_RAW_IMAGE_TYPES = tuple(MEDIA_TYPES.values())


def _header_options(request: Request) -> dict[str, Any]:
    return {name: request.headers[header] for name, header in OPTION_HEADERS.items() if header in request.headers}


async def _read_raw_image(request: Request, settings: Settings) -> tuple[FileUpload, dict[str, Any]]:
    """A bare image body (`Content-Type: application/dicom`, `image/png`, `image/jpeg`); options from headers."""
    data = await read_body(request, settings.max_upload_bytes)
    return FileUpload(data=data), {}


async def _read_upload(request: Request, settings: Settings) -> tuple[FileUpload, dict[str, Any]]:
    form = await read_multipart(request, settings.max_upload_bytes)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("a multipart upload needs its file in the field 'file'")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes")
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        return FileUpload(data=data, filename=upload.filename or ""), fields
    finally:
        await form.close()


async def _read_tensor_json(request: Request, settings: Settings) -> tuple[TensorUpload, dict[str, Any]]:
    data = await read_body(request, settings.max_upload_bytes)
    body = await parse_json(TensorJobRequest, data, _describe_validation)
    options = {
        "callback_url": body.callback_url,
        "priority": body.priority,
        "idempotency_key": body.idempotency_key,
        "deadline_s": body.deadline_s,
    }
    return TensorUpload(inputs=body.inputs), {k: v for k, v in options.items() if v is not None}


def _options(fields: dict[str, Any], header_key: str | None, tenant: str) -> SubmitOptions:
    deadline = fields.get("deadline_s")
    try:
        deadline_s = float(deadline) if deadline not in (None, "") else None
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"deadline_s must be a number of seconds, got {deadline!r}") from e
    key = fields.get("idempotency_key") or header_key
    return SubmitOptions(
        callback_url=fields.get("callback_url") or None,
        priority=parse_priority(fields.get("priority")),
        idempotency_key=key,
        tenant=tenant,
        deadline_s=deadline_s,
    )


def _refuse_query_options(request: Request) -> None:
    if request.url.query:
        raise OptionsInQuery(
            "job options are not taken from the query string (it ends up in logs); send them in the body, "
            "or for a bare image body in the headers Idempotency-Key, Inferq-Priority and Inferq-Callback-Url"
        )


def _check_length(request: Request, settings: Settings) -> None:
    # Multipart framing adds a little; refuse early only what cannot fit by any measure.
    check_declared_length(request, settings.max_upload_bytes + 64 * 1024)


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
        principal: Submitter,
        idempotency_key: str | None = Header(default=None),
        prefer: str | None = Header(
            default=None, description="RFC 7240 `wait=N`: answer 200 with the job if it ends within N seconds"
        ),
    ) -> JSONResponse:
        state.registry.get_model(model)
        _refuse_query_options(request)
        _check_length(request, state.settings)
        content_type = request.headers.get("content-type", "")
        upload: FileUpload | TensorUpload
        if content_type.startswith("multipart/form-data"):
            upload, fields = await _read_upload(request, state.settings)
        elif content_type.startswith("application/json"):
            upload, fields = await _read_tensor_json(request, state.settings)
        elif content_type.startswith(_RAW_IMAGE_TYPES):
            upload, fields = await _read_raw_image(request, state.settings)
        else:
            raise InvalidRequest(
                "send multipart/form-data with a 'file' field, a bare application/dicom, image/png or image/jpeg "
                "body, or application/json with 'inputs'"
            )
        options = _options({**_header_options(request), **fields}, idempotency_key, principal.tenant)
        with bind_context(model=model, tenant=principal.tenant):
            receipt = await anyio.to_thread.run_sync(
                state.submitter.submit, model, upload, options, limiter=state.probe_limiter
            )
            log.info(
                "job %s %s",
                receipt.job_id,
                "replayed" if receipt.replayed else "accepted",
                extra={"job_id": receipt.job_id},
            )
        return await _accepted(state, request, receipt, prefer_wait_s(prefer))

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, name="get_job")
    async def get_job(
        job_id: str,
        principal: Reader,
        wait_s: float = Query(default=0.0, ge=0, description="Wait up to this long (capped) for the job to end"),
    ) -> dict[str, Any]:
        # The ownership check is the first read's: another tenant's job reads as unknown, one round trip saved.
        [view] = await state.wait_jobs([job_id], wait_s, tenant=principal.tenant)
        if view is None:
            raise UnknownJob(f"no job with id {job_id!r}")
        return dict(view)

    @app.get("/v1/jobs", responses=_ERRORS, summary="This tenant's recent jobs, newest first")
    def list_jobs(
        principal: Reader,
        model: str | None = Query(default=None, description="Only this model's jobs"),
        status: Annotated[JobStatusName | None, Query(description="Only jobs in this state")] = None,
        limit: int = Query(default=50, ge=1, le=500),
        before: float | None = Query(default=None, description="Only jobs submitted before this epoch second"),
    ) -> dict[str, Any]:
        if model is not None:
            state.registry.get_model(model)
        # Read a few pages' worth so that filters still fill the page; the index is this tenant's alone.
        job_ids = state.stores.jobs.tenant_job_ids(principal.tenant, limit=limit * 4, before_s=before)
        views = [v for v in state.stores.jobs.views(job_ids) if v is not None]
        chosen = [
            v for v in views if (model is None or v["model"] == model) and (status is None or v["status"] == status)
        ]
        return {"jobs": chosen[:limit]}

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS, summary="Cancel a queued job")
    def cancel_job(job_id: str, principal: Submitter) -> dict[str, Any]:
        require_own_job(state.stores.jobs, principal, job_id)
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
        model: str, request: Request, principal: Submitter, idempotency_key: str | None = Header(default=None)
    ) -> dict[str, Any]:
        state.registry.get_model(model)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            items = await read_file_items(request, state.settings, idempotency_key)
        elif content_type.startswith("application/json"):
            items = read_tensor_items(await read_json_body(request, state.settings), state.settings, idempotency_key)
        else:
            raise InvalidRequest("send application/json with 'jobs', or multipart/form-data with 'file' parts")
        # Every job of the request belongs to the submitting key's tenant (its idempotency keys too).
        items = [_for_tenant(item, principal.tenant) for item in items]
        readable = [item for item in items if isinstance(item, SubmitItem)]
        submitted = await run_in_threadpool(state.submitter.submit_many, model, readable) if readable else []
        jobs = _bulk_entries(request, outcomes_of(items, submitted))
        accepted = sum("job_id" in job for job in jobs)
        return {"accepted": accepted, "rejected": len(jobs) - accepted, "jobs": jobs}

    @app.post("/v1/jobs/query", responses=_ERRORS, summary="Many jobs' states, waiting until all (or any) end")
    async def query_jobs(query: JobsQuery, principal: Reader) -> dict[str, Any]:
        if len(query.job_ids) > state.settings.max_bulk_jobs:
            raise InvalidRequest(f"a query holds at most {state.settings.max_bulk_jobs} job ids")
        # Another tenant's job reads as unknown, exactly like one that does not exist.
        tenants = await run_in_threadpool(state.stores.jobs.tenants, query.job_ids)
        own = [job_id for job_id, tenant in zip(query.job_ids, tenants, strict=True) if tenant == principal.tenant]
        waited = dict(zip(own, await state.wait_jobs(own, query.wait_s, query.until), strict=True)) if own else {}
        views = [waited.get(job_id) for job_id in query.job_ids]
        jobs = [
            view or {"job_id": job_id, "error": UnknownJob("no such job").to_dict()}
            for job_id, view in zip(query.job_ids, views, strict=True)
        ]
        return {"pending": sum(not is_final(view) for view in views), "jobs": jobs}


def _for_tenant(item: SubmitItem | ClientError, tenant: str) -> SubmitItem | ClientError:
    if isinstance(item, ClientError):
        return item
    return dataclasses.replace(item, options=dataclasses.replace(item.options, tenant=tenant))


def _bulk_entries(request: Request, outcomes: list[Receipt | InferqError]) -> list[dict[str, Any]]:
    # One route lookup for the whole request: starlette's `url_for` scans the routes each time.
    template = str(request.url_for("get_job", job_id="{job_id}")).replace("%7Bjob_id%7D", "{job_id}")
    return [
        {"error": outcome.to_dict()}
        if isinstance(outcome, InferqError)
        else {
            "job_id": outcome.job_id,
            "status": outcome.status,
            "status_url": template.replace("{job_id}", outcome.job_id),
            "replayed": outcome.replayed,
        }
        for outcome in outcomes
    ]


def _register_model_routes(app: FastAPI, state: ApiState) -> None:
    @app.get("/v1/models", summary="The model registry, with each model's queue depth", responses=_ERRORS)
    def list_models(principal: Reader) -> dict[str, Any]:
        # A tenant sees its own waiting jobs, never another tenant's volume.
        depths = state.stores.jobs.tenant_queue_depths(principal.tenant, list(state.registry))
        return {"models": [{**spec.metadata(), "queue_depth": depths[name]} for name, spec in state.registry.items()]}

    @app.get("/v1/models/{model}", responses=_ERRORS)
    def get_model(model: str, principal: Reader) -> dict[str, Any]:
        spec = state.registry.get_model(model)
        depth = state.stores.jobs.tenant_queue_depths(principal.tenant, [model])[model]
        return {**spec.metadata(), "queue_depth": depth}


def _register_health_routes(app: FastAPI, state: ApiState) -> None:
    @app.get("/healthz", summary="The API process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Ready when Redis answers and every served model has a live worker",
        responses={503: {"model": ErrorResponse}},
    )
    def readyz() -> JSONResponse:
        try:
            consumers = consumers_per_model(state.stores, state.registry, served_models(state.settings, state.registry))
        except redis.RedisError as e:
            raise BackendUnavailable("Redis does not answer") from e
        models = {name: {"workers": count} for name, count in consumers.items()}
        idle = sorted(name for name, count in consumers.items() if count == 0)
        if not idle:
            return JSONResponse({"status": "ready", "models": models})
        raise NoConsumer(f"no live worker consumes the queue of: {', '.join(idle)}")


def _register_metrics_route(app: FastAPI, state: ApiState) -> None:
    # Open like the health probes, so that Prometheus scrapes it without a key: it carries models, queues, statuses,
    # error codes and counts, never a job id, a tenant or anything from an upload. Keep it off the public network.
    cluster = ClusterCollector(state.stores.text, state.registry, state.stores.jobs)
    registry = api_metrics_registry(cluster, ApiProcessCollector(lambda: state.hub.waiting))

    @app.get("/metrics", summary="Prometheus metrics of the cluster (no authentication, nothing sensitive)")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = registry or load_registry(settings.registry_path)
    stores = stores_for(settings)
    celery_app = build_celery(settings, registry)
    submitter = JobSubmitter(settings=settings, registry=registry, stores=stores, celery_app=celery_app)
    hub = CompletionHub(settings.redis_url_or_default)
    state = ApiState(
        settings=settings,
        registry=registry,
        stores=stores,
        submitter=submitter,
        probe_limiter=anyio.CapacityLimiter(settings.max_concurrent_probes),
        hub=hub,
    )

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
        # Off: no /docs, /redoc or /openapi.json at all.
        openapi_url="/openapi.json" if settings.api_docs_enabled else None,
    )
    app.state.api_keys = ApiKeyStore(stores.text)
    app.add_middleware(AccessLogMiddleware, known_models=list(registry))
    _install_error_handlers(app, settings)
    _register_job_routes(app, state)
    _register_bulk_routes(app, state)
    _register_model_routes(app, state)
    _register_health_routes(app, state)
    _register_metrics_route(app, state)
    return app
