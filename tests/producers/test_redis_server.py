"""The embedded Redis (demo and tests) is locked down like a production one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from inferq.producers.redis_server import EmbeddedRedis


def test_redis_refuses_a_client_without_the_password(redis_server: EmbeddedRedis) -> None:
    # No retries: redis-py counts a refused AUTH as a connection error and would back off for seconds first.
    anonymous = redis.Redis(port=redis_server.port, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    wrong = redis.Redis(port=redis_server.port, password="wrong", socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    assert redis.Redis.from_url(redis_server.url).ping()


def test_the_password_is_in_a_private_file_and_not_on_the_command_line(redis_server: EmbeddedRedis) -> None:
    config = redis_server.config_path
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert f"requirepass {redis_server.password}" in config.read_text()
    process = redis_server._process
    assert process is not None
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert redis_server.password.encode() not in cmdline


def test_redis_is_on_loopback_and_never_evicts(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("protected-mode")["protected-mode"] == "yes"
