"""API keys: each maps to one tenant and a set of roles, stored in Redis as the sha256 of the key only.

A key reads `iq_<key id>_<secret>`. The key id is public (it names the key in `inferq keys list`, in the access
log and in `inferq keys revoke`); the secret is 256 random bits, so a plain sha256 suffices to store it (a slow
password hash protects guessable secrets, and these are not). Every request looks its key up in Redis, so a
created or revoked key takes effect at once, in every API process, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import redis

from inferq.protocol.errors import InvalidRequest, Unauthorized
from inferq.protocol.keys import api_key_index, api_key_record

ROLES = ("submit", "read", "admin")
_KEY_PATTERN = re.compile(r"^iq_(?P<key_id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")
_TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's id (never the key), its tenant and roles."""

    key_id: str
    tenant: str
    roles: frozenset[str]

    def may(self, *roles: str) -> bool:
        """Admins may do everything within their tenant; other keys what their roles name."""
        return "admin" in self.roles or bool(self.roles.intersection(roles))


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: the only moment its secret exists outside the client's hands."""

    principal: Principal
    key: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def parse_roles(text: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    unknown = roles - set(ROLES)
    if not roles or unknown:
        raise InvalidRequest(f"roles must be a comma-separated subset of {', '.join(ROLES)}; got {text!r}")
    return roles


def check_tenant(tenant: str) -> str:
    if not _TENANT_PATTERN.match(tenant):
        raise InvalidRequest("a tenant is 1..64 characters: lowercase letters, digits, '.', '_', '-'")
    return tenant


class ApiKeyStore:
    """Keys in Redis. `redis_client` must decode responses to `str`."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self._redis = redis_client

    def create(self, tenant: str, roles: frozenset[str]) -> IssuedKey:
        principal = Principal(key_id=secrets.token_hex(8), tenant=check_tenant(tenant), roles=roles)
        key = f"iq_{principal.key_id}_{secrets.token_urlsafe(32)}"
        record = {
            "tenant": principal.tenant,
            "roles": ",".join(sorted(roles)),
            "sha256": _digest(key),
            "created_at": f"{time.time():.3f}",
        }
        pipe = self._redis.pipeline()
        pipe.hset(api_key_record(principal.key_id), mapping=record)  # type: ignore[arg-type]
        pipe.sadd(api_key_index(), principal.key_id)
        pipe.execute()
        return IssuedKey(principal=principal, key=key)

    def list(self) -> list[dict[str, str]]:
        """Every key's id, tenant, roles and creation time; never a secret or its hash."""
        key_ids = sorted(str(k) for k in self._redis.smembers(api_key_index()))  # type: ignore[union-attr,unused-ignore]
        pipe = self._redis.pipeline()
        for key_id in key_ids:
            pipe.hmget(api_key_record(key_id), "tenant", "roles", "created_at")
        rows = []
        for key_id, (tenant, roles, created_at) in zip(key_ids, pipe.execute(), strict=True):
            if tenant is not None:
                rows.append({"key_id": key_id, "tenant": tenant, "roles": roles, "created_at": created_at})
        return rows

    def revoke(self, key_id: str) -> bool:
        """Delete the key; True if it existed. Requests with it get 401 from the next one on."""
        pipe = self._redis.pipeline()
        pipe.delete(api_key_record(key_id))
        pipe.srem(api_key_index(), key_id)
        deleted, _ = pipe.execute()
        return bool(deleted)

    def authenticate(self, key: str) -> Principal:
        """The key's principal, or `Unauthorized` (the same message whether the key is malformed, unknown,
        revoked or wrong, so a caller learns nothing about which key ids exist)."""
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise Unauthorized("the API key is not valid")
        key_id = match["key_id"]
        tenant, roles, stored = self._redis.hmget(api_key_record(key_id), "tenant", "roles", "sha256")
        if stored is None or not hmac.compare_digest(str(stored), _digest(key)):
            raise Unauthorized("the API key is not valid")
        return Principal(key_id=key_id, tenant=str(tenant), roles=frozenset(str(roles).split(",")))
