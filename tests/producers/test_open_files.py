"""Many waiting clients against the API's open-file limit: `inferq api` raises its soft limit to the hard one, and
where even that is too few, a client turned away meets a 503 with Retry-After (or a closed connection), never a 500,
and the API serves on once they are gone."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.stack import ServiceStack
from inferq.protocol.connections import redis_client
from tests.producers.conftest import fraud_inputs

pytestmark = pytest.mark.slow

_OPEN_FILES = 256  # the API's soft and hard limit in the test below
_WAIT_S = 5
_WAITERS = 300
# Starts `inferq api` with its open-file limits set.
_WITH_LIMIT = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}));"
    " sys.argv = ['inferq', 'api']; runpy.run_module('inferq.producers.cli', run_name='__main__')"
)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    code = "from inferq.producers.open_files import raise_open_files_limit; print(raise_open_files_limit())"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, wanted))

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=lower, timeout=60, check=True
    )
    assert int(done.stdout) == wanted


def test_inferq_api_raises_its_soft_open_file_limit_at_start(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    port = free_port()
    with EmbeddedRedis(tmp_path / "redis") as server:
        env = {**os.environ, "INFERQ_REDIS_URL": server.url, "INFERQ_API_PORT": str(port)}
        with ServiceStack(env, tmp_path / "logs") as services:
            services.start_command("api", [sys.executable, "-c", _WITH_LIMIT.format(soft=256, hard=wanted)])
            services.wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
            assert f"open-file limit: {wanted}" in services.log_of("api")


@dataclass
class LimitedApi:
    url: str
    key: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def client(self) -> InferqClient:
        return InferqClient(self.url, api_key=self.key)


@pytest.fixture
def limited_api(tmp_path: Path) -> Iterator[LimitedApi]:
    port = free_port()
    with EmbeddedRedis(tmp_path / "redis") as server:
        with redis_client(server.url, decode=True) as client:
            key = ApiKeyStore(client).create("lone", frozenset({"admin"})).key
        env = {**os.environ, "INFERQ_REDIS_URL": server.url, "INFERQ_API_PORT": str(port)}
        with ServiceStack(env, tmp_path / "logs") as services:
            services.start_command(
                "api", [sys.executable, "-c", _WITH_LIMIT.format(soft=_OPEN_FILES, hard=_OPEN_FILES)]
            )
            services.wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
            yield LimitedApi(f"http://127.0.0.1:{port}", key)
            assert "unexpected" not in services.log_of("api")


def test_clients_beyond_what_the_open_files_allow_are_turned_away_without_a_500(limited_api: LimitedApi) -> None:
    # Given 300 queued jobs (no worker), and an API that may open 256 files
    with limited_api.client() as client:
        job_ids = [entry["job_id"] for entry in client.submit_many("fraud", inputs=[fraud_inputs()] * _WAITERS)]
    # When a request for each waits for its job (5 s), all at once: more connections than the API may open
    answers = asyncio.run(_wait_for_each(limited_api, job_ids))
    # Then each either waited and answered with its job (still queued), or was turned away: a 503 with Retry-After
    # where the API ran out of files mid-request, or a connection closed at once; never a 500 (the fixture also
    # checks that the API logged nothing unexpected)
    counts = Counter(answers)
    refused = {answer for answer in counts if answer.startswith("connection closed")} | {"503"}
    assert counts["queued"] > 0 and set(counts) <= {"queued"} | refused, counts
    # And once they are gone, the API serves as before
    with limited_api.http() as http:
        assert http.post("/v1/models/fraud/jobs", json={"inputs": fraud_inputs()}).status_code == 202


async def _wait_for_each(api: LimitedApi, job_ids: list[str]) -> list[str]:
    """Each job waited for by a GET of its own on a connection of its own, all at once: the job's status, the
    HTTP status of a refusal, or the transport error."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api.key}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=60, limits=limits) as http:

        async def wait(job_id: str) -> str:
            try:
                response = await http.get(f"/v1/jobs/{job_id}", params={"wait_s": _WAIT_S})
            except httpx.TransportError as e:
                return f"connection closed ({type(e).__name__})"
            if response.status_code == 503:
                assert response.headers["Retry-After"] and response.json()["error"]["retryable"]
            return str(response.json()["status"]) if response.status_code == 200 else str(response.status_code)

        return list(await asyncio.gather(*(wait(job_id) for job_id in job_ids)))
