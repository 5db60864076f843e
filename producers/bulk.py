"""Bulk requests: many jobs in one HTTP call, and many jobs' states in one read.

A bulk submission is read into `SubmitItem`s, one per job, each with its own options; an item that cannot be read
gets its own error and never fails the others. The items then go through `JobSubmitter.submit_many`, the same
path as a single job: one pipeline writes every record and blob, then one Celery message per job.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from inferq.config import Settings
from inferq.producers.submit import Outcome, SubmitItem, SubmitOptions
from inferq.protocol.codec import TensorPayload
from inferq.protocol.errors import ClientError, InferqError, InvalidRequest, PayloadTooLarge
from inferq.protocol.intake import FileUpload, TensorUpload
from inferq.protocol.priority import parse_priority

# Each item of a bulk request, or its error, in request order.
ItemOrError = SubmitItem | ClientError


class BulkTensorJob(BaseModel):
    """One job of a JSON bulk submission: the single-job body."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorPayload] = Field(min_length=1)
    callback_url: str | None = None
    priority: str | int = "routine"
    idempotency_key: str | None = None
    deadline_s: float | None = Field(default=None, gt=0)
    parameters: dict[str, Any] | None = None


class BulkTensorRequest(BaseModel):
    """Items are checked one by one, so one malformed job does not refuse the request."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] = Field(min_length=1)


class JobsQuery(BaseModel):
    """Many jobs' states at once, waiting up to `wait_s` until all (or any) of them are final."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[str] = Field(min_length=1)
    wait_s: float = Field(default=0.0, ge=0)
    until: Literal["all", "any"] = "all"


def _item_key(header_key: str | None, index: int, own_key: str | None) -> str | None:
    """An item's own key, else one derived from the request's `Idempotency-Key`, so a retried bulk request
    gets the same jobs back."""
    if own_key:
        return own_key
    return f"{header_key}#{index}" if header_key else None


def _limit(count: int, settings: Settings) -> None:
    if count > settings.max_bulk_jobs:
        raise InvalidRequest(f"a bulk request holds at most {settings.max_bulk_jobs} jobs, got {count}")


def read_tensor_items(body: bytes, settings: Settings, header_key: str | None) -> list[ItemOrError]:
    try:
        request = BulkTensorRequest.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(f"a bulk request is {{'jobs': [{{'inputs': [...]}}, ...]}}: {_first_error(e)}") from e
    _limit(len(request.jobs), settings)
    return [_tensor_item(raw, _index, header_key) for _index, raw in enumerate(request.jobs)]


def _tensor_item(raw: dict[str, Any], index: int, header_key: str | None) -> ItemOrError:
    try:
        job = BulkTensorJob.model_validate(raw)
        options = SubmitOptions(
            callback_url=job.callback_url,
            priority=parse_priority(job.priority),
            idempotency_key=_item_key(header_key, index, job.idempotency_key),
            deadline_s=job.deadline_s,
        )
    except ValidationError as e:
        return InvalidRequest(f"job {index}: {_first_error(e)}")
    except ClientError as e:
        return e
    return SubmitItem(TensorUpload(inputs=job.inputs), options)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"


async def _capped(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(f"a bulk upload exceeds {max_bytes} bytes in all")
        yield chunk


async def read_json_body(request: Request, settings: Settings) -> bytes:
    """The whole JSON body, refused once it passes `max_bulk_upload_bytes` instead of after reading it all."""
    return b"".join([chunk async for chunk in _capped(request, settings.max_bulk_upload_bytes)])


async def read_file_items(request: Request, settings: Settings, header_key: str | None) -> list[ItemOrError]:
    """Several `file` parts; `priority` and `callback_url` apply to all, `idempotency_key` may be given once per
    file (in file order)."""
    parser = MultiPartParser(
        Headers(raw=request.headers.raw),
        _capped(request, settings.max_bulk_upload_bytes),
        max_files=settings.max_bulk_jobs,
        max_fields=settings.max_bulk_jobs + 10,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"cannot read the multipart body: {e.message}") from e
    try:
        files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise InvalidRequest("a bulk upload needs one or more files in fields named 'file'")
        _limit(len(files), settings)
        keys = [str(k) for k in form.getlist("idempotency_key")]
        if keys and len(keys) != len(files):
            raise InvalidRequest(f"give one idempotency_key per file or none: {len(keys)} keys, {len(files)} files")
        shared = {name: form.get(name) for name in ("priority", "callback_url")}
        return [
            await _file_item(upload, i, keys[i] if keys else None, shared, settings, header_key)
            for i, upload in enumerate(files)
        ]
    finally:
        await form.close()


async def _file_item(
    upload: UploadFile,
    index: int,
    own_key: str | None,
    shared: dict[str, Any],
    settings: Settings,
    header_key: str | None,
) -> ItemOrError:
    data = await upload.read(settings.max_upload_bytes + 1)
    try:
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"file {index} exceeds {settings.max_upload_bytes} bytes")
        options = SubmitOptions(
            callback_url=str(shared["callback_url"]) if shared.get("callback_url") else None,
            priority=parse_priority(shared.get("priority")),
            idempotency_key=_item_key(header_key, index, own_key),
            deadline_s=_deadline(shared.get("deadline_s")),
        )
    except ClientError as e:
        return e
    return SubmitItem(FileUpload(data=data, filename=upload.filename or ""), options)


def outcomes_of(items: Sequence[ItemOrError], submitted: Sequence[Outcome]) -> list[Outcome]:
    """Merge the submitter's outcomes (for the readable items) back among the items that could not be read."""
    results = iter(submitted)
    return [item if isinstance(item, InferqError) else next(results) for item in items]


def _deadline(value: object) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(str(value))
    except ValueError as e:
        raise InvalidRequest(f"deadline_s must be a number of seconds, got {value!r}") from e
