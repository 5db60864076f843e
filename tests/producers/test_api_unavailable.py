"""With Redis gone, the API says so with a 503 and a code, never a 500 or a hang."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from inferq.producers.redis_server import free_port
from inferq.producers.stack import ServiceStack


def test_readyz_and_submit_answer_503_when_redis_is_down(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "INFERQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "INFERQ_API_PORT": str(port)}
    api = f"http://127.0.0.1:{port}"
    with ServiceStack(env, tmp_path) as services:
        services.start("api", "api")
        services.wait_http(f"{api}/healthz", timeout_s=60)
        ready = httpx.get(f"{api}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "backend_unavailable"
        inputs = [{"name": "transactions", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]
        # A well-formed key must be looked up in Redis: with Redis gone that is a 503, not a 401.
        auth = {"Authorization": "Bearer iq_0123456789abcdef_" + "k" * 43}
        submitted = httpx.post(f"{api}/v1/models/fraud/jobs", json={"inputs": inputs}, headers=auth, timeout=30)
        assert submitted.status_code == 503
        error = submitted.json()["error"]
        assert error["code"] == "backend_unavailable" and error["retryable"] is True
        assert httpx.get(f"{api}/v1/jobs/abc", headers=auth, timeout=30).status_code == 503
