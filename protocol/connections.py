"""Redis clients: one for text (job records), one for bytes (blobs), both from the same URL.

A `rediss://` URL is TLS with the server's certificate verified (against `ca_file`, else the system's CAs),
for redis-py here and for Celery's broker and result backend (`tls_options`, used by the Celery configuration):
kombu alone would connect to a `rediss://` broker without checking the certificate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from inferq.config import Settings
from inferq.protocol.blobs import RedisBlobStore
from inferq.protocol.jobs import JobStore

_SOCKET_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0


def tls_options(url: str, ca_file: Path | None = None) -> dict[str, Any] | None:
    """The TLS options for a `rediss://` URL (certificate required), or None for a plain one."""
    if urlsplit(url).scheme != "rediss":
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if ca_file is not None:
        options["ssl_ca_certs"] = str(ca_file)
    return options


def redis_client(url: str, *, decode: bool, ca_file: Path | None = None) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        health_check_interval=30,
        **(tls_options(url, ca_file) or {}),
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


def open_stores(url: str, *, queued_ttl_s: int, result_ttl_s: int, ca_file: Path | None = None) -> Stores:
    text = redis_client(url, decode=True, ca_file=ca_file)
    jobs = JobStore(text, queued_ttl_s=queued_ttl_s, result_ttl_s=result_ttl_s)
    return Stores(text=text, jobs=jobs, blobs=RedisBlobStore(redis_client(url, decode=False, ca_file=ca_file)))


def stores_for(settings: Settings) -> Stores:
    """The job store and blobs of a deployment, as its settings name them (TLS CA included)."""
    return open_stores(
        settings.redis_url_or_default,
        queued_ttl_s=settings.queued_ttl_s,
        result_ttl_s=settings.result_ttl_s,
        ca_file=settings.redis_tls_ca_file,
    )
