"""Uploads kept as blobs, out of the broker: task messages carry a reference, never the pixels."""

from __future__ import annotations

import uuid
from typing import Protocol

import redis

from inferq.protocol.errors import BlobMissing
from inferq.protocol.keys import blob_key


class BlobStore(Protocol):
    """Where original uploads live until their job's record expires."""

    def put(self, data: bytes, *, ttl_s: int) -> str: ...

    def put_as(self, blob_ref: str, data: bytes, *, ttl_s: int) -> None: ...

    def get(self, blob_ref: str) -> bytes: ...

    def delete(self, blob_ref: str) -> None: ...


class RedisBlobStore:
    """Blobs as Redis strings under `inferq:blob:<ref>`; `redis_client` must NOT decode responses."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client

    def put(self, data: bytes, *, ttl_s: int) -> str:
        blob_ref = uuid.uuid4().hex
        self.put_as(blob_ref, data, ttl_s=ttl_s)
        return blob_ref

    def put_as(self, blob_ref: str, data: bytes, *, ttl_s: int) -> None:
        self._redis.set(blob_key(blob_ref), data, ex=ttl_s)

    def get(self, blob_ref: str) -> bytes:
        data: bytes | None = self._redis.get(blob_key(blob_ref))  # type: ignore[assignment]
        if data is None:
            raise BlobMissing(f"the upload of this job ({blob_ref}) is no longer stored")
        return data

    def delete(self, blob_ref: str) -> None:
        self._redis.delete(blob_key(blob_ref))
