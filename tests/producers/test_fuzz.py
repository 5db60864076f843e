"""The API fuzzed from its own OpenAPI document: no 5xx, and every error in the documented form."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from inferq.config import DEFAULT_REGISTRY_PATH
from inferq.protocol.keys import consumers_key
from inferq.protocol.registry import load_registry
from tests.producers.conftest import Api, make_api

# Enough to reach every route with both valid and broken input, and to stay well under a minute on 2 cores.
_EXAMPLES_PER_OPERATION = 60


@pytest.fixture
def fuzzed(redis_url: str) -> Iterator[Api]:
    # Every model has a worker's heartbeat, so /readyz answers 200 (its 503 is tested in test_readiness).
    with redis.Redis.from_url(redis_url) as client:
        for spec in load_registry(DEFAULT_REGISTRY_PATH).values():
            client.zadd(consumers_key(spec.queue_name), {"fuzz-worker": time.time() + 3600})
    yield from make_api(redis_url)


def _check(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"code", "message", "retryable"}, error
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
        assert isinstance(error["retryable"], bool)


def test_no_5xx_and_every_error_in_the_documented_form(fuzzed: Api) -> None:
    schema = schemathesis.openapi.from_dict(fuzzed.client.get("/openapi.json").json())
    base_url = str(fuzzed.client.base_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7  # submit, get, cancel, list and get model, healthz, readyz

    for operation in operations:
        _fuzz(operation, fuzzed, base_url)


def _fuzz(operation: Any, fuzzed: Api, base_url: str) -> None:
    role = "submit" if operation.method.upper() in ("POST", "DELETE") else "read"

    @given(case=operation.as_strategy())
    @settings(
        max_examples=_EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case: Any) -> None:
        headers = dict(case.headers or {})
        if "authorization" not in {k.lower() for k in headers}:
            headers |= fuzzed.auth("north", role)
        _check(case.call(base_url=base_url, headers=headers))

    call()
