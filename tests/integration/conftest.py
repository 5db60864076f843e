"""The end-to-end stack: a real Redis, real worker subprocesses (the `inferq` form and the plain `celery` form) and
the HTTP API in a subprocess. Started once per session; its logs are printed when a test fails."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.rabbitmq_server import EmbeddedRabbitMQ, find_rabbitmq_server
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.protocol.connections import redis_client
from tests.callback_receiver import CALLBACK_SECRET

_READY_TIMEOUT_S = 120.0

# Two more queues for the tests: one that no worker consumes (so a job there can be cancelled before it starts),
# one consumed by a worker started the plain Celery way.
_EXTRA_MODEL = """
[models.{name}]
version = "0.1.0"
pool = "cpu"
format = "safetensors"
weights = "fraud-0.1.0.safetensors"
sha256 = "{sha}"
trained = false
weights_seed = 30
labels = ["fraud"]
output_name = "fraud_probability"
architecture = {{ name = "mlp", hidden = [64, 32] }}
input = {{ kind = "tensor", name = "transactions", shape = [-1, 30], datatype = "FP32" }}
max_batch_size = 16
"""


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    services: ServiceStack
    samples: list[Path]
    tmp: Path
    api_key: str
    redis_url: str

    def client(self) -> InferqClient:
        return InferqClient(self.api_url, api_key=self.api_key)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _test_registry(tmp: Path) -> Path:
    from inferq.protocol.registry import load_registry

    fraud_sha = load_registry(DEFAULT_REGISTRY_PATH).get_model("fraud").sha256
    path = tmp / "models.toml"
    extra = "".join(_EXTRA_MODEL.format(name=name, sha=fraud_sha) for name in ("fraud-idle", "fraud-celery"))
    # Without chest-xray's max_batch_ms, which on a CPU keeps its batches to one film: these tests check that films
    # there together share a forward pass; the cap itself is tested with the batcher (tests/workers/test_batcher.py).
    default = DEFAULT_REGISTRY_PATH.read_text()
    assert "\nmax_batch_ms = " in default
    uncapped = "\n".join(line for line in default.splitlines() if not line.startswith("max_batch_ms = "))
    path.write_text(uncapped + "\n" + extra)
    return path


@pytest.fixture(scope="session")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    api_port = free_port()
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": redis_server.url_for(0),
        "INFERQ_REGISTRY_PATH": str(_test_registry(tmp)),
        "INFERQ_MODELS_DIR": str(Settings().models_dir),
        "INFERQ_API_PORT": str(api_port),
        "INFERQ_TORCH_THREADS": "1",
        # The worker metrics server is tested on its own worker (test_observability); no port fights here.
        "INFERQ_WORKER_METRICS_PORT": "0",
        # fraud-idle has no worker on purpose: it is not served, so the API can be ready without it.
        "INFERQ_SERVED_MODELS": "chest-xray,fraud,fraud-celery",
        "INFERQ_CALLBACK_SECRET": CALLBACK_SECRET,
        "INFERQ_CALLBACK_ALLOW": "127.0.0.1",
        "INFERQ_CALLBACK_BACKOFF_S": "0.5",
    }
    services = ServiceStack(env, tmp / "logs")
    services.start("worker", "worker", "--pool", "cpu", "--models", "chest-xray,fraud", "--concurrency", "1")
    celery_argv = [sys.executable, "-m", "celery", "-A", "inferq.workers.app", "worker", "-Q", "fraud-celery"]
    services.start_command("celery-worker", [*celery_argv, "--pool", "solo", "-n", "plain@%h", "-l", "info"])
    services.start("api", "api")
    services.start("reconciler", "reconciler")
    services.start("callbacks", "callbacks", "--threads", "4")
    api_url = f"http://127.0.0.1:{api_port}"
    try:
        services.wait_http(f"{api_url}/healthz", timeout_s=_READY_TIMEOUT_S)
        # Ready: every served model has a worker whose models are loaded.
        services.wait_http(f"{api_url}/readyz", timeout_s=_READY_TIMEOUT_S)
        redis_url = env["INFERQ_REDIS_URL"]
        env["INFERQ_API_KEY"] = api_key = _issue_api_key(redis_url)
        yield Stack(api_url, env, services, write_samples(tmp / "samples"), tmp, api_key, redis_url)
    finally:
        services.stop()


def _issue_api_key(redis_url: str) -> str:
    """A key of the tests' tenant that may submit, cancel and read; the CLI takes it from INFERQ_API_KEY."""
    with redis_client(redis_url, decode=True) as client:
        return ApiKeyStore(client).create("tests", frozenset({"submit", "read"})).key


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """INFERQ_TEST_AMQP_URL when given, else a private RabbitMQ; skips only where no rabbitmq-server exists."""
    given = os.environ.get("INFERQ_TEST_AMQP_URL")
    if given:
        yield given
        return
    if find_rabbitmq_server() is None or shutil.which("epmd") is None:
        pytest.skip("RabbitMQ tests need Debian's rabbitmq-server (or INFERQ_TEST_AMQP_URL): none on this machine")
    with EmbeddedRabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server.url


@pytest.fixture(scope="session")
def stack_amqp(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack on RabbitMQ: its own Redis for job records and blobs, one worker, the API."""
    tmp = tmp_path_factory.mktemp("stack-amqp")
    api_port = free_port()
    with EmbeddedRedis(tmp / "redis") as records:
        env = {
            **os.environ,
            "INFERQ_REDIS_URL": records.url,
            "INFERQ_BROKER_URL": rabbitmq_url,
            # fraud-idle and fraud-celery have no worker here on purpose.
            "INFERQ_SERVED_MODELS": "chest-xray,fraud",
            "INFERQ_REGISTRY_PATH": str(_test_registry(tmp)),
            "INFERQ_MODELS_DIR": str(Settings().models_dir),
            "INFERQ_API_PORT": str(api_port),
            "INFERQ_TORCH_THREADS": "1",
        }
        services = ServiceStack(env, tmp / "logs")
        services.start("worker", "worker", "--pool", "cpu", "--models", "chest-xray,fraud", "--concurrency", "1")
        services.start("api", "api")
        api_url = f"http://127.0.0.1:{api_port}"
        try:
            services.wait_http(f"{api_url}/healthz", timeout_s=_READY_TIMEOUT_S)
            # Ready: the worker consumes its queues on RabbitMQ (its heartbeats go to the records' Redis).
            services.wait_http(f"{api_url}/readyz", timeout_s=_READY_TIMEOUT_S)
            env["INFERQ_API_KEY"] = api_key = _issue_api_key(records.url)
            yield Stack(api_url, env, services, write_samples(tmp / "samples"), tmp, api_key, records.url)
        finally:
            services.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    funcargs = item.funcargs if hasattr(item, "funcargs") else {}
    stack = funcargs.get("stack") or funcargs.get("stack_amqp")
    if report.failed and isinstance(stack, Stack):
        for name in stack.services.processes:
            report.sections.append((f"{name} log (tail)", stack.services.log_of(name)[-6000:]))
    return report
