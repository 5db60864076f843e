"""The API served by uvicorn in a thread of the test process (real HTTP) against the real test Redis; no worker,
so jobs stay queued. Two tenants, each with one key per role."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from config import Settings
from producers.api import create_app
from producers.api_keys import ROLES, ApiKeyStore
from producers.redis_server import free_port

TENANTS = ("north", "south")


@dataclass
class Api:
    client: httpx.Client
    store: ApiKeyStore
    keys: dict[tuple[str, str], str]
    redis_url: str

    def auth(self, tenant: str, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(tenant, role)]}"}


def make_api(redis_url: str, **settings: object) -> Iterator[Api]:
    app = create_app(Settings(redis_url=redis_url, **settings))  # type: ignore[arg-type]
    store: ApiKeyStore = app.state.api_keys
    keys = {(t, r): store.create(t, frozenset({r})).key for t in TENANTS for r in ROLES}
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield Api(client=client, store=store, keys=keys, redis_url=redis_url)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def api(redis_url: str) -> Iterator[Api]:
    yield from make_api(redis_url)


def fraud_inputs() -> list[dict[str, object]]:
    return [{"name": "transactions", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]
