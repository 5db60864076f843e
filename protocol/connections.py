"""Redis clients: one for text (job records), one for bytes (blobs), both from the same URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis

from protocol.blobs import RedisBlobStore
from protocol.jobs import JobStore

_SOCKET_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0


def redis_client(url: str, *, decode: bool) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        health_check_interval=30,
    )


def redact_url(url: str) -> str:
    """The URL without its password, for logs and banners."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Stores:
    """The stores every process needs, built once from the Redis URL."""

    text: redis.Redis
    jobs: JobStore
    blobs: RedisBlobStore


def open_stores(url: str, *, queued_ttl_s: int, result_ttl_s: int) -> Stores:
    text = redis_client(url, decode=True)
    jobs = JobStore(text, queued_ttl_s=queued_ttl_s, result_ttl_s=result_ttl_s)
    return Stores(text=text, jobs=jobs, blobs=RedisBlobStore(redis_client(url, decode=False)))
