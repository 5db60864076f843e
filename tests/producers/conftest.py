"""An API subprocess on a private Redis, for tests that stop Redis or fill a queue; no workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from config import DEFAULT_REGISTRY_PATH, Settings
from producers.redis_server import EmbeddedRedis, free_port, port_is_free
from producers.stack import ServiceStack
from protocol.keys import job_key
from protocol.registry import load_registry

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

    def store(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, decode_responses=True)

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
            services.wait_http(f"{url}/readyz", timeout_s=60)
            yield LoneApi(url=url, redis=server, services=services)


@pytest.fixture
def api(lone_api: LoneApi) -> Iterator[LoneApi]:
    """The module's API with an empty Redis, running again if a test stopped it."""
    if port_is_free("127.0.0.1", lone_api.redis.port):
        lone_api.redis.start()
    with lone_api.store() as client:
        client.flushall()
    yield lone_api
