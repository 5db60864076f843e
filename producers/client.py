"""The Python client: submit (one job or many), wait, cancel over HTTP. Needs neither torch nor worker code.

Waiting is long-polling: the server holds each request until the job ends (or its wait cap), so a client never
polls in a loop. Refusals that a later attempt may overcome (`503` while Redis is down, `429` while a queue is
full, a dropped connection) are retried with exponential backoff and jitter, honouring `Retry-After`. Every
submission carries an idempotency key (a fresh one per job when the caller gives none) that every retry reuses,
so a retried submission never makes a second job.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as TransportError

from inferq.protocol.bare_images import MEDIA_TYPES, OPTION_HEADERS, kind_of
from inferq.protocol.errors import RemoteError

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
RETRYABLE_HTTP_STATUSES = frozenset({429, 503})
# Bulk requests a client keeps on their way at once (`submit_many`).
_BULK_REQUESTS_IN_FLIGHT = 4
# Connections a client keeps open for reuse: enough for its bulk requests and a few threads sharing it.
_KEPT_CONNECTIONS = 16
# The server caps one wait (`max_wait_s`, 60 s by default); longer waits are several requests.
_LONGEST_POLL_S = 60.0
# A server that answers a wait at once without a final job (an old one, without long-polling) is not hammered.
_MIN_POLL_GAP_S = 0.2
_BULK_MAX_BYTES = 32 * 1024 * 1024
# A form field: a plain value, or a file as (filename, bytes, content type).
FormField = tuple[str, str | tuple[str, bytes, str]]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long and how often to retry a refusal; `max_attempts=1` turns retrying off."""

    max_attempts: int = 8
    first_delay_s: float = 0.25
    max_delay_s: float = 10.0
    give_up_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"invalid retry policy: {self}")

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with jitter; at least the server's `Retry-After`, spread so clients do not return
        all at once."""
        if retry_after_s is not None:
            return retry_after_s + random.uniform(0, self.first_delay_s)  # noqa: S311 - jitter, not a secret
        ceiling_s = min(self.max_delay_s, self.first_delay_s * 2**attempt)
        return ceiling_s / 2 + random.uniform(0, ceiling_s / 2)  # noqa: S311


class InferqClient:
    """A thin client of the HTTP API. Errors the API answers with are raised as `RemoteError` (code kept)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
    ):
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._path_prefix = urlsplit(base_url).path.rstrip("/")
        # urllib3 rather than httpx: about half the client CPU per request (measured: 1.0 against 1.9 ms for a
        # long-poll GET), which a hospital's upload process, and the cores it shares with workers, notice. One
        # pool per client, safe to share between threads.
        self._pool = urllib3.connection_from_url(base_url, maxsize=_KEPT_CONNECTIONS, block=False, retries=False)

    def __enter__(self) -> InferqClient:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    # --- submitting

    def submit(
        self,
        model: str,
        file: str | Path | bytes | None = None,
        *,
        inputs: list[dict[str, Any]] | None = None,
        filename: str | None = None,
        callback_url: str | None = None,
        priority: str | int | None = None,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
    ) -> str:
        """Submit a file (image models) or OIP `inputs` (tensor models); returns the job id. A job not started
        within `deadline_s` ends `expired` without costing compute."""
        body = self._submit(
            model, file, inputs, filename, callback_url, priority, idempotency_key, deadline_s=deadline_s
        )
        return str(body["job_id"])

    def submit_and_wait(
        self,
        model: str,
        file: str | Path | bytes | None = None,
        *,
        inputs: list[dict[str, Any]] | None = None,
        wait_s: float = 30.0,
        **options: Any,
    ) -> dict[str, Any]:
        """Submit and return the finished job (the synchronous path): `Prefer: wait`, then long-polling."""
        started = time.monotonic()
        prefer_s = max(0, int(min(wait_s, _LONGEST_POLL_S)))
        body = self._submit(model, file, inputs, options.pop("filename", None), prefer_s=prefer_s, **options)
        if body.get("status") in FINAL_STATUSES and "attempts" in body:
            return body
        return self.result(str(body["job_id"]), wait_s=max(0.0, wait_s - (time.monotonic() - started)))

    def _submit(
        self,
        model: str,
        file: str | Path | bytes | None,
        inputs: list[dict[str, Any]] | None,
        filename: str | None,
        callback_url: str | None = None,
        priority: str | int | None = None,
        idempotency_key: str | None = None,
        prefer_s: int | None = None,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        if (file is None) == (inputs is None):
            raise ValueError("give exactly one of file or inputs")
        given = {"callback_url": callback_url, "priority": priority, "deadline_s": deadline_s}
        options = {k: v for k, v in given.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
        if prefer_s is not None:
            headers["Prefer"] = f"wait={prefer_s}"
        url = f"/v1/models/{model}/jobs"
        wait_s = float(prefer_s or 0)
        if inputs is not None:
            body = {"inputs": inputs, **options}
            return _json(self._request("POST", url, json_body=body, headers=headers, wait_s=wait_s))
        data, name = _file_bytes(file, filename)  # type: ignore[arg-type]
        kind = kind_of(data)
        if kind is not None:
            # A bare body, options in headers: no multipart to encode here or to parse in the API, which reads
            # the magic bytes again whatever the type says. Anything else goes as a file, for the API to refuse.
            headers |= {OPTION_HEADERS[k]: str(v) for k, v in options.items()} | {"Content-Type": MEDIA_TYPES[kind]}
            return _json(self._request("POST", url, body=data, headers=headers, wait_s=wait_s))
        form: list[FormField] = [(k, str(v)) for k, v in options.items()]
        form.append(("file", (name, data, "application/octet-stream")))
        return _json(self._request("POST", url, form=form, headers=headers, wait_s=wait_s))

    def submit_many(
        self,
        model: str,
        files: Sequence[str | Path | bytes] | None = None,
        *,
        inputs: Sequence[list[dict[str, Any]]] | None = None,
        callback_url: str | None = None,
        priority: str | int | None = None,
        idempotency_keys: Sequence[str] | None = None,
        jobs_per_request: int = 100,
        requests_in_flight: int = _BULK_REQUESTS_IN_FLIGHT,
    ) -> list[dict[str, Any]]:
        """Submit many jobs with few requests (bulk): `files` for image models or one `inputs` list per job for
        tensor models. Returns one entry per job, in order: `{"job_id", "status", ...}` or `{"error": {...}}`.
        Up to `requests_in_flight` requests are sent at once, so that the server works on one while the next is
        on its way (one at a time left cores idle: about a third fewer jobs per second)."""
        if (files is None) == (inputs is None):
            raise ValueError("give exactly one of files or inputs")
        count = len(files if files is not None else inputs)  # type: ignore[arg-type]
        keys = list(idempotency_keys) if idempotency_keys is not None else [new_idempotency_key() for _ in range(count)]
        if len(keys) != count:
            raise ValueError(f"give one idempotency key per job: {len(keys)} keys for {count} jobs")
        options = {k: v for k, v in {"callback_url": callback_url, "priority": priority}.items() if v is not None}
        url = f"/v1/models/{model}/jobs/bulk"
        requests: list[dict[str, Any]] = []
        if inputs is not None:
            for start in range(0, count, jobs_per_request):
                chunk = [
                    {"inputs": job_inputs, "idempotency_key": key, **options}
                    for job_inputs, key in zip(inputs[start : start + jobs_per_request], keys[start:], strict=False)
                ]
                requests.append({"json_body": {"jobs": chunk}})
        else:
            loaded = [_file_bytes(f, None) for f in files]  # type: ignore[union-attr]
            for start, stop in _file_chunks([len(data) for data, _ in loaded], jobs_per_request):
                form: list[FormField] = [(k, str(v)) for k, v in options.items()]
                form += [("idempotency_key", key) for key in keys[start:stop]]
                form += [("file", (name, data, "application/octet-stream")) for data, name in loaded[start:stop]]
                requests.append({"form": form})

        def send(request: dict[str, Any]) -> list[dict[str, Any]]:
            return list(_json(self._request("POST", url, **request))["jobs"])

        # The connection pool may be shared between threads; map keeps the requests' order.
        with ThreadPoolExecutor(max(1, min(requests_in_flight, len(requests)))) as pool:
            return [entry for entries in pool.map(send, requests) for entry in entries]

    # --- reading and waiting

    def status(self, job_id: str) -> dict[str, Any]:
        return _json(self._request("GET", f"/v1/jobs/{job_id}"))

    def result(self, job_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
        """The job once final, waiting up to `wait_s` by long-polling; raises `TimeoutError` if it is still queued
        or running then."""
        deadline = time.monotonic() + wait_s
        while True:
            asked_s = max(0.0, min(deadline - time.monotonic(), _LONGEST_POLL_S))
            sent = time.monotonic()
            response = self._request("GET", f"/v1/jobs/{job_id}", params={"wait_s": f"{asked_s:.3f}"}, wait_s=asked_s)
            job = _json(response)
            if job["status"] in FINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {wait_s} s")
            _pause_if_answered_early(sent, asked_s)

    def results(
        self, job_ids: Sequence[str], *, wait_s: float = 0.0, until: Literal["all", "any"] = "all"
    ) -> list[dict[str, Any]]:
        """Many jobs' states in few requests, waiting up to `wait_s` until all (or any) are final. Returns them in
        order as they then are (check each `status`); an unknown id gives `{"job_id", "error"}`."""
        deadline = time.monotonic() + wait_s
        jobs: list[dict[str, Any]] = []
        for start in range(0, len(job_ids), 1000):
            jobs += self._query(list(job_ids[start : start + 1000]), deadline, until)
        return jobs

    def _query(self, job_ids: list[str], deadline: float, until: str) -> list[dict[str, Any]]:
        while True:
            asked_s = max(0.0, min(deadline - time.monotonic(), _LONGEST_POLL_S))
            sent = time.monotonic()
            body = {"job_ids": job_ids, "wait_s": asked_s, "until": until}
            answer = _json(self._request("POST", "/v1/jobs/query", json_body=body, wait_s=asked_s))
            finals = [job.get("status") in FINAL_STATUSES or "status" not in job for job in answer["jobs"]]
            if (all(finals) if until == "all" else any(finals)) or time.monotonic() >= deadline:
                return list(answer["jobs"])
            _pause_if_answered_early(sent, asked_s)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _json(self._request("DELETE", f"/v1/jobs/{job_id}"))

    def models(self) -> list[dict[str, Any]]:
        return list(_json(self._request("GET", "/v1/models"))["models"])

    # --- the one place requests are sent and retried

    def _request(
        self,
        method: str,
        path: str,
        *,
        wait_s: float = 0.0,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        form: list[FormField] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send, retrying 429/503 and dropped connections per the retry policy; the last answer (or transport
        error, a `urllib3.exceptions.HTTPError`) stands when the policy gives up."""
        url = self._path_prefix + path + (f"?{urlencode(params)}" if params else "")
        sent_headers = {**self._headers, **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent_headers["Content-Type"] = "application/json"
        elif form is not None:
            body, sent_headers["Content-Type"] = urllib3.encode_multipart_formdata(form)
        timeout = urllib3.Timeout(connect=self._timeout_s, read=self._timeout_s + wait_s)
        started = time.monotonic()
        for attempt in range(self._retry.max_attempts):
            try:
                response = self._pool.urlopen(
                    method, url, body=body, headers=sent_headers, timeout=timeout, retries=False, redirect=False
                )
            except TransportError:
                if not self._sleep_before_retry(attempt, None, started):
                    raise
                continue
            if response.status not in RETRYABLE_HTTP_STATUSES:
                return response
            if not self._sleep_before_retry(attempt, _retry_after_s(response), started):
                return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _sleep_before_retry(self, attempt: int, retry_after_s: float | None, started: float) -> bool:
        delay_s = self._retry.delay_s(attempt, retry_after_s)
        last = attempt + 1 >= self._retry.max_attempts
        if last or time.monotonic() - started + delay_s > self._retry.give_up_after_s:
            return False
        time.sleep(delay_s)
        return True


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def _pause_if_answered_early(sent: float, asked_s: float) -> None:
    if asked_s > 0 and time.monotonic() - sent < _MIN_POLL_GAP_S:
        time.sleep(_MIN_POLL_GAP_S)


def _retry_after_s(response: urllib3.BaseHTTPResponse) -> float | None:
    """RFC 9110 `Retry-After`: delay-seconds or an HTTP date."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _file_chunks(sizes: list[int], jobs_per_request: int) -> Iterator[tuple[int, int]]:
    """Index ranges of at most `jobs_per_request` files and about `_BULK_MAX_BYTES` (a single larger file goes
    alone)."""
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= jobs_per_request or total + size > _BULK_MAX_BYTES):
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _file_bytes(file: str | Path | bytes, filename: str | None) -> tuple[bytes, str]:
    if isinstance(file, bytes):
        return file, filename or "upload"
    path = Path(file)
    return path.read_bytes(), filename or path.name


def _json(response: urllib3.BaseHTTPResponse) -> dict[str, Any]:
    try:
        body = json.loads(response.data)
    except ValueError:
        body = None
    if 200 <= response.status < 300 and isinstance(body, dict):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": response.data[:200].decode(errors="replace")}
    raise RemoteError(
        str(error.get("code")),
        str(error.get("message")),
        http_status=response.status,
        retryable=bool(error.get("retryable")),
    )
