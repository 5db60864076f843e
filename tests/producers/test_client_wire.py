"""What the client puts on the wire, read by a recording HTTP server: an image goes as a bare body with its options
in headers (nothing to encode or parse as multipart), anything else as a multipart file."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from inferq.producers.client import InferqClient
from inferq.producers.samples import write_samples


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        answer = json.dumps({"job_id": "0" * 32, "status": "queued"}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/behind/a/prefix", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("suffix", "media_type"), [(".png", "image/png"), (".jpg", "image/jpeg"), (".dcm", "application/dicom")]
)
def test_an_image_goes_as_a_bare_body_with_its_options_in_headers(
    recorder: tuple[str, list[dict[str, Any]]], tmp_path: Path, suffix: str, media_type: str
) -> None:
    url, seen = recorder
    sample = next(path for path in write_samples(tmp_path) if path.suffix == suffix)
    with InferqClient(url, api_key="k") as client:
        client.submit("chest-xray", sample, priority="stat", deadline_s=60, callback_url="https://h/x")
    [request] = seen
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert request["path"] == "/behind/a/prefix/v1/models/chest-xray/jobs"
    assert headers["content-type"] == media_type and request["body"] == sample.read_bytes()
    assert (headers["inferq-priority"], headers["inferq-deadline-s"]) == ("stat", "60")
    assert headers["inferq-callback-url"] == "https://h/x" and headers["authorization"] == "Bearer k"
    assert len(headers["idempotency-key"]) == 32


def test_a_file_of_no_known_kind_goes_as_a_multipart_file(recorder: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = recorder
    with InferqClient(url) as client:
        client.submit("chest-xray", b"plain text", filename="notes.txt", priority="stat")
    [request] = seen
    assert request["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="priority"\r\n\r\nstat' in request["body"]
    assert b'filename="notes.txt"' in request["body"] and b"plain text" in request["body"]
