"""/readyz: ready only when Redis answers and every served model has a live worker (read from their heartbeats)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from inferq.protocol.keys import consumers_key
from tests.producers.conftest import Api, make_api


@pytest.fixture
def served(redis_url: str) -> Iterator[Api]:
    yield from make_api(redis_url, served_models="chest-xray,fraud")


def test_a_served_model_without_a_live_worker_makes_the_api_not_ready(served: Api) -> None:
    # Given no worker at all
    response = served.client.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_consumer" and "chest-xray" in error["message"] and "fraud" in error["message"]
    with redis.Redis.from_url(served.redis_url) as client:
        # When a chest-xray worker heartbeats, fraud still has none; a heartbeat long past counts as gone
        client.zadd(consumers_key("chest-xray"), {"node-a": time.time()})
        client.zadd(consumers_key("fraud"), {"node-b": time.time() - 60})
        response = served.client.get("/readyz")
        assert response.status_code == 503 and "fraud" in response.json()["error"]["message"]
        assert "chest-xray" not in response.json()["error"]["message"]
        # Then once fraud has a live worker too, the API is ready and says how many workers each model has
        client.zadd(consumers_key("fraud"), {"node-b": time.time()})
    response = served.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "models": {"chest-xray": {"workers": 1}, "fraud": {"workers": 1}}}


def test_readyz_needs_no_key_and_healthz_stays_up(served: Api) -> None:
    assert served.client.get("/healthz").json() == {"status": "ok"}
    assert served.client.get("/readyz").status_code == 503  # 503, not 401: probes carry no key
