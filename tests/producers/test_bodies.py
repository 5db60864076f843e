"""Bodies over the limit, however they arrive, are refused while read; a client that leaves is no error."""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from pydicom import dcmread

from inferq.producers.samples import write_samples
from tests.producers.conftest import Api, make_api

LIMIT_BYTES = 1024 * 1024
_CHUNK = b"0" * 65536
# What the kernel's socket buffers may swallow before the server stops reading: far less than the 64 MB sent.
_BUFFER_SLACK_BYTES = 16 * 1024 * 1024


@pytest.fixture
def small_api(redis_url: str) -> Iterator[Api]:
    yield from make_api(redis_url, max_upload_bytes=LIMIT_BYTES)


def _raw_request(
    api: Api, head: str, body_chunks: Iterator[bytes], *, stop_after_bytes: int | None = None
) -> tuple[bytes, int]:
    """Send `head` then chunks until the server answers (or `stop_after_bytes`); returns (answer, bytes sent)."""
    url = urlsplit(str(api.client.base_url))
    sock = socket.create_connection((url.hostname, url.port))
    sent = 0
    try:
        sock.sendall(head.encode("latin-1"))
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0] or (stop_after_bytes is not None and sent >= stop_after_bytes):
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        if stop_after_bytes is not None:
            return b"", sent
        return _read_answer(sock), sent
    finally:
        sock.close()


def _read_answer(sock: socket.socket) -> bytes:
    """The response head and body: read until the server closes or the declared body is in."""
    sock.settimeout(10)
    answer = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return answer
        answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), -1
        )
        if not data or (length >= 0 and len(body) >= length):
            return answer


def _chunked(total_bytes: int, prefix: bytes = b"") -> Iterator[bytes]:
    if prefix:
        yield b"%x\r\n%s\r\n" % (len(prefix), prefix)
    for _ in range(total_bytes // len(_CHUNK)):
        yield b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK)
    yield b"0\r\n\r\n"


def _head(api: Api, content_type: str, extra: str = "Transfer-Encoding: chunked\r\n") -> str:
    auth = api.auth("north", "submit")["Authorization"]
    return (
        f"POST /v1/models/{{model}}/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        f"Content-Type: {content_type}\r\n{extra}\r\n"
    )


@pytest.mark.parametrize(
    ("model", "content_type", "prefix"),
    [
        ("fraud", "application/json", b'{"inputs": [{"name": "transactions", "data": ['),
        ("chest-xray", "application/dicom", b""),
        (
            "chest-xray",
            "multipart/form-data; boundary=BOUND",
            b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n\r\n',
        ),
    ],
    ids=["json", "bare-dicom", "multipart"],
)
def test_a_chunked_body_past_the_limit_is_refused_while_read(
    small_api: Api, model: str, content_type: str, prefix: bytes
) -> None:
    head = _head(small_api, content_type).replace("{model}", model)
    answer, sent = _raw_request(small_api, head, _chunked(64 * 1024 * 1024, prefix))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer
    # The server stopped reading soon after the limit: it never held, nor spooled, the 64 MB.
    assert sent < LIMIT_BYTES + _BUFFER_SLACK_BYTES


def test_a_declared_length_past_the_limit_is_refused_before_reading(small_api: Api) -> None:
    response = small_api.client.post(
        "/v1/models/fraud/jobs",
        content=b"{" * (LIMIT_BYTES + 70_000),
        headers={**small_api.auth("north", "submit"), "content-type": "application/json"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_a_client_that_disconnects_mid_upload_leaves_no_error(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    head = _head(api, "application/dicom", "Content-Length: 10000000\r\n").replace("{model}", "chest-xray")
    _, sent = _raw_request(api, head, iter([_CHUNK] * 100), stop_after_bytes=4 * len(_CHUNK))
    assert sent > 0
    deadline = time.monotonic() + 10
    while "client_disconnected" not in caplog.text and '"status":499' not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text
    assert api.client.get("/healthz").status_code == 200


def test_options_in_the_query_string_are_refused(api: Api) -> None:
    response = api.client.post(
        "/v1/models/fraud/jobs?idempotency_key=ACC-1234",
        json={"inputs": [{"name": "transactions", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]},
        headers=api.auth("north", "submit"),
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "options_in_query"


def test_a_bare_image_takes_its_options_from_headers(api: Api, tmp_path: object) -> None:
    dicom = write_samples(tmp_path)[0]  # type: ignore[arg-type]
    assert dcmread(dicom).Modality  # a real DICOM sample
    response = api.client.post(
        "/v1/models/chest-xray/jobs",
        content=dicom.read_bytes(),
        headers={
            **api.auth("north", "submit"),
            "content-type": "application/dicom",
            "inferq-priority": "3",
            "idempotency-key": "ACC-77",
        },
    )
    assert response.status_code == 202, response.text
    again = api.client.post(
        "/v1/models/chest-xray/jobs",
        content=dicom.read_bytes(),
        headers={**api.auth("north", "submit"), "content-type": "application/dicom", "idempotency-key": "ACC-77"},
    )
    assert again.json()["job_id"] == response.json()["job_id"]
    bad = api.client.post(
        "/v1/models/chest-xray/jobs",
        content=dicom.read_bytes(),
        headers={**api.auth("north", "submit"), "content-type": "application/dicom", "inferq-priority": "high"},
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_running_out_of_memory_is_a_503_not_a_500(redis_url: str) -> None:
    from fastapi import FastAPI

    from inferq.config import Settings
    from inferq.producers.api import create_app
    from tests.producers.conftest import serve

    app: FastAPI = create_app(Settings(redis_url=redis_url))  # type: ignore[arg-type]

    def exhausted() -> None:
        raise MemoryError

    app.add_api_route("/exhausted", exhausted)
    import httpx

    with serve(app) as base_url:
        response = httpx.get(f"{base_url}/exhausted")
    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "overloaded",
        "message": response.json()["error"]["message"],
        "retryable": True,
    }
