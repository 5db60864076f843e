"""Two API fixtures. `api`: served by uvicorn in a thread of the test process (real HTTP) against the real test
Redis, two tenants with one key per role, no worker. `lone`: an API subprocess on its own private Redis, for tests
that stop Redis or fill a queue; one admin key."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.api import create_app
from inferq.producers.api_keys import ROLES, ApiKeyStore
from inferq.producers.redis_server import EmbeddedRedis, free_port, port_is_free
from inferq.producers.stack import ServiceStack
from inferq.protocol.keys import job_key
from inferq.protocol.registry import load_registry

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


# A model with a small queue limit that no worker consumes, so its queue only grows.
_TINY_MODEL = """
[models.tiny]
version = "0.1.0"
pool = "cpu"
format = "safetensors"
weights = "fraud-0.1.0.safetensors"
sha256 = "{sha}"
trained = false
labels = ["fraud"]
output_name = "fraud_probability"
max_queue_depth = 2
architecture = {{ name = "mlp", hidden = [64, 32] }}
input = {{ kind = "tensor", name = "transactions", shape = [-1, 30], datatype = "FP32" }}
"""


@dataclass
class LoneApi:
    url: str
    redis: EmbeddedRedis
    services: ServiceStack
    registry_path: str = ""
    key: str = ""

    def store(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    @property
    def http(self) -> httpx.Client:
        """Plain HTTP with this API's admin key."""
        return httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def new_key(self) -> None:
        """A fresh admin key (each test starts from an empty Redis)."""
        with self.store() as client:
            self.key = ApiKeyStore(client).create("lone", frozenset({"admin"})).key

    def job_count(self) -> int:
        with self.store() as client:
            return len(list(client.scan_iter(job_key("*"))))


@pytest.fixture(scope="module")
def lone_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoneApi]:
    tmp = tmp_path_factory.mktemp("lone-api")
    sha = load_registry(DEFAULT_REGISTRY_PATH).get_model("fraud").sha256
    registry = tmp / "models.toml"
    registry.write_text(DEFAULT_REGISTRY_PATH.read_text() + _TINY_MODEL.format(sha=sha))
    port = free_port()
    with EmbeddedRedis(tmp / "redis") as server:
        env = {
            **os.environ,
            "INFERQ_REDIS_URL": server.url,
            "INFERQ_REGISTRY_PATH": str(registry),
            "INFERQ_MODELS_DIR": str(Settings().models_dir),
            "INFERQ_API_PORT": str(port),
            "INFERQ_QUEUE_FULL_RETRY_AFTER_S": "1",
            "INFERQ_UNAVAILABLE_RETRY_AFTER_S": "1",
            "INFERQ_MAX_BULK_JOBS": "5",
            "INFERQ_MAX_BULK_UPLOAD_BYTES": "200000",
        }
        with ServiceStack(env, tmp / "logs") as services:
            services.start("api", "api")
            url = f"http://127.0.0.1:{port}"
            services.wait_http(f"{url}/healthz", timeout_s=60)
            yield LoneApi(url=url, redis=server, services=services, registry_path=str(registry))


@pytest.fixture
def lone(lone_api: LoneApi) -> Iterator[LoneApi]:
    """The module's API with an empty Redis, running again if a test stopped it."""
    if port_is_free("127.0.0.1", lone_api.redis.port):
        lone_api.redis.start()
    with lone_api.store() as client:
        client.flushall()
    lone_api.new_key()
    yield lone_api
