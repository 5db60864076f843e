"""kombu's Redis transport with one client per channel: the same messages, without a client per operation."""

from __future__ import annotations

import json

import redis

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.protocol import redis_transport
from inferq.protocol.celery_config import build_celery
from inferq.protocol.keys import task_name_for
from inferq.protocol.registry import load_registry

REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


def test_a_redis_broker_sends_through_one_shared_client_per_channel(redis_url: str) -> None:
    app = build_celery(Settings(redis_url=redis_url), REGISTRY)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, redis_transport.Transport)
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
    # A task sent through it lands in its queue's list as kombu writes it
    app.send_task(task_name_for("fraud"), args=["job-1", "blob-1"], task_id="job-1", queue="fraud")
    [raw] = redis.Redis.from_url(redis_url).lrange("fraud", 0, -1)
    assert json.loads(raw)["headers"]["id"] == "job-1"


def test_a_tls_broker_url_keeps_kombus_own_transport() -> None:
    conf = build_celery(Settings(redis_url="rediss://:pw@cache.example:6380/0"), REGISTRY).conf
    assert "broker_transport" not in conf or conf.broker_transport != redis_transport.TRANSPORT
