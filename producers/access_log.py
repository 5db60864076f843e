"""The API's access log, for a privacy officer: one JSON line per request saying who (key id, tenant) did what
(the route's action) to which job, when, and how it ended.

It replaces uvicorn's access log, which prints the query string. Only values the service itself issued or
validated are written: the route template (never the raw path), a job id only if it has the shape inferq gives
job ids, a model only if the registry names it. No query string, header, body or error message is ever logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferq.producers.auth import PRINCIPAL_STATE

ACCESS_LOGGER = "inferq.access"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# Probes every few seconds would drown the lines that matter; a failing probe is still logged.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz"})

log = logging.getLogger(ACCESS_LOGGER)


def configure_access_log(path: Path | None) -> None:
    """Send the access log to `path` (appended) or standard error, one bare JSON line per record."""
    handler: logging.Handler = (
        logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class AccessLogMiddleware:
    """Pure ASGI middleware, so it sees the final status even of a streamed or failed response."""

    def __init__(self, app: ASGIApp, *, known_models: Iterable[str]) -> None:
        self.app = app
        self.known_models = frozenset(known_models)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with the request, so the auth dependency's principal shows here
        started = time.monotonic()
        outcome: dict[str, Any] = {"status": 500, "location": None}

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                outcome["location"] = headers.get(b"location", b"").decode("latin-1") or None
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._write(scope, outcome, (time.monotonic() - started) * 1000)

    def _write(self, scope: Scope, outcome: dict[str, Any], duration_ms: float) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route in _QUIET_ROUTES and outcome["status"] < 400:
            return
        params = scope.get("path_params") or {}
        principal = (scope.get("state") or {}).get(PRINCIPAL_STATE)
        job_id = params.get("job_id") or (outcome["location"] or "").rsplit("/", 1)[-1]
        model = params.get("model")
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "key_id": getattr(principal, "key_id", None),
            "tenant": getattr(principal, "tenant", None),
            "action": getattr(scope.get("route"), "name", None),
            "method": scope.get("method"),
            "route": route,
            "job_id": job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None,
            "model": model if model in self.known_models else None,
            "status": outcome["status"],
            "duration_ms": round(duration_ms, 1),
            "client": (scope.get("client") or (None,))[0],
        }
        log.info(json.dumps(record, separators=(",", ":")))
