"""Reading request bodies with the size limit held however the body arrives.

`Content-Length` is only a claim, and chunked uploads have none: every body is counted as it is read and refused
with 413 as soon as it passes the limit, so no more than the limit (plus multipart framing) is ever held in memory
or spooled to disk. A client that goes away mid-upload is not an error of ours. JSON is parsed in a worker
thread, so a large tensor body does not stall every other request on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from inferq.protocol.errors import ClientDisconnected, InvalidRequest, PayloadTooLarge

# Multipart framing (boundaries, part headers, the small option fields) on top of the file itself.
MULTIPART_FRAMING_BYTES = 64 * 1024
_MAX_FORM_FIELDS = 10
_MAX_FIELD_BYTES = 4096

ModelT = TypeVar("ModelT", bound=BaseModel)


def check_declared_length(request: Request, limit_bytes: int) -> None:
    """Refuse at once a body whose declared length cannot fit; a body without one is counted while read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit_bytes:
        raise PayloadTooLarge(f"the upload exceeds {limit_bytes} bytes")


async def _counted(request: Request, limit_bytes: int, shown_limit_bytes: int) -> AsyncGenerator[bytes, None]:
    seen_bytes = 0
    try:
        async for chunk in request.stream():
            seen_bytes += len(chunk)
            if seen_bytes > limit_bytes:
                raise PayloadTooLarge(f"the upload exceeds {shown_limit_bytes} bytes")
            yield chunk
    except ClientDisconnect as e:
        raise ClientDisconnected("the client disconnected before its upload was read") from e


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, refused with 413 the moment it passes `limit_bytes`."""
    data = bytearray()
    async for chunk in _counted(request, limit_bytes, limit_bytes):
        data += chunk
    return bytes(data)


async def read_multipart(request: Request, limit_bytes: int) -> FormData:
    """The form, its file spooled to a temporary file that never grows past the limit plus framing. The caller
    closes the form (`await form.close()`)."""
    stream = _counted(request, limit_bytes + MULTIPART_FRAMING_BYTES, limit_bytes)
    parser = MultiPartParser(
        request.headers, stream, max_files=1, max_fields=_MAX_FORM_FIELDS, max_part_size=_MAX_FIELD_BYTES
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"invalid multipart body: {e.message}") from e


async def parse_json(model: type[ModelT], data: bytes, describe: Callable[[list[Any]], str]) -> ModelT:
    """Validate JSON into `model` in a worker thread; a validation error becomes `InvalidRequest`."""
    try:
        return await run_in_threadpool(model.model_validate_json, data)
    except ValidationError as e:
        raise InvalidRequest(describe(list(e.errors()))) from e
