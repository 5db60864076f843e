"""Shared fixtures: a real Redis started for the session (never the developer's own), one database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferq.producers.redis_server import EmbeddedRedis

REPO_ROOT = Path(__file__).resolve().parent.parent
# Database 0 belongs to the end-to-end stack; unit tests take 1..15 in turn and empty theirs afterwards.
_UNIT_DATABASES = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    url = redis_server.url_for(next(_UNIT_DATABASES))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def dump_redis(url: str) -> bytes:
    """Every key and every value of the database at `url`, whatever its type, as one blob to search."""
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    readers = {
        b"string": lambda k: [client.get(k)],
        b"hash": lambda k: [b for kv in client.hgetall(k).items() for b in kv],
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": lambda k: list(client.smembers(k)),
        b"zset": lambda k: [m for m, _ in client.zrange(k, 0, -1, withscores=True)],
        b"stream": lambda k: [str(client.xrange(k)).encode()],
    }
    for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = client.type(key)
        parts += [v for v in readers.get(kind, lambda _: [])(key) if v]
    client.close()
    return b"\n".join(parts)
