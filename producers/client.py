"""The Python client: submit, poll, wait, cancel over HTTP. Needs neither torch nor worker code."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from protocol.errors import RemoteError

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})


class InferqClient:
    """A thin client of the HTTP API. Errors the API answers with are raised as `RemoteError` (code kept)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport, headers=headers
        )

    def __enter__(self) -> InferqClient:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(
        self,
        model: str,
        file: str | Path | bytes | None = None,
        *,
        inputs: list[dict[str, Any]] | None = None,
        filename: str | None = None,
        callback_url: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Submit a file (image models) or OIP `inputs` (tensor models); returns the job id."""
        if (file is None) == (inputs is None):
            raise ValueError("give exactly one of file or inputs")
        options = {"callback_url": callback_url, "priority": priority, "idempotency_key": idempotency_key}
        options = {k: v for k, v in options.items() if v is not None}
        url = f"/v1/models/{model}/jobs"
        if inputs is not None:
            response = self._http.post(url, json={"inputs": inputs, **options})
        else:
            data, name = _file_bytes(file, filename)  # type: ignore[arg-type]
            form = {k: str(v) for k, v in options.items()}
            response = self._http.post(url, files={"file": (name, data, "application/octet-stream")}, data=form)
        return str(_json(response)["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        return _json(self._http.get(f"/v1/jobs/{job_id}"))

    def result(self, job_id: str, *, wait_s: float = 0.0, poll_interval_s: float = 0.25) -> dict[str, Any]:
        """The job once final, waiting up to `wait_s`; raises `TimeoutError` if it is still queued or running."""
        deadline = time.monotonic() + wait_s
        while True:
            job = self.status(job_id)
            if job["status"] in FINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {wait_s} s")
            time.sleep(poll_interval_s)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _json(self._http.delete(f"/v1/jobs/{job_id}"))

    def models(self) -> list[dict[str, Any]]:
        return list(_json(self._http.get("/v1/models"))["models"])


def _file_bytes(file: str | Path | bytes, filename: str | None) -> tuple[bytes, str]:
    if isinstance(file, bytes):
        return file, filename or "upload"
    path = Path(file)
    return path.read_bytes(), filename or path.name


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": response.text[:200]}
    raise RemoteError(
        str(error.get("code")),
        str(error.get("message")),
        http_status=response.status_code,
        retryable=bool(error.get("retryable")),
    )
