"""Every route with every role of the job's own tenant and of another tenant, no key and a bad key."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from inferq.producers.api_keys import ROLES, ApiKeyStore, parse_roles
from inferq.protocol.errors import InvalidRequest
from tests.conftest import dump_redis
from tests.producers.conftest import TENANTS, Api, fraud_inputs, make_api

OWNER, OTHER = TENANTS
# route name -> (method, path template, roles that may call it)
ROUTES: dict[str, tuple[str, str, set[str]]] = {
    "submit_job": ("POST", "/v1/models/fraud/jobs", {"submit", "admin"}),
    "get_job": ("GET", "/v1/jobs/{job_id}", {"read", "admin"}),
    "cancel_job": ("DELETE", "/v1/jobs/{job_id}", {"submit", "admin"}),
    "list_models": ("GET", "/v1/models", {"read", "admin"}),
    "get_model": ("GET", "/v1/models/fraud", {"read", "admin"}),
    "list_jobs": ("GET", "/v1/jobs", {"read", "admin"}),
    "submit_bulk": ("POST", "/v1/models/fraud/jobs/bulk", {"submit", "admin"}),
    "query_jobs": ("POST", "/v1/jobs/query", {"read", "admin"}),
}
_SUCCESS = {
    "submit_job": 202,
    "get_job": 200,
    "cancel_job": 200,
    "list_models": 200,
    "get_model": 200,
    "list_jobs": 200,
    "submit_bulk": 200,
    "query_jobs": 200,
}
_JOB_ROUTES = {"get_job", "cancel_job"}


def _submit(api: Api, tenant: str = OWNER, **headers: str) -> str:
    response = api.client.post(
        "/v1/models/fraud/jobs", json={"inputs": fraud_inputs()}, headers={**api.auth(tenant, "submit"), **headers}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _call(api: Api, route: str, headers: dict[str, str]) -> Any:
    method, template, _ = ROUTES[route]
    path = template.format(job_id=_submit(api)) if "{job_id}" in template else template
    bodies: dict[str, Any] = {
        "submit_job": {"inputs": fraud_inputs()},
        "submit_bulk": {"jobs": [{"inputs": fraud_inputs()}]},
        "query_jobs": {"job_ids": [_submit(api)]},
    }
    body = {"json": bodies[route]} if route in bodies else {}
    return api.client.request(method, path, headers=headers, **body)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("tenant", TENANTS)
def test_every_route_with_every_role_of_both_tenants(api: Api, route: str, role: str, tenant: str) -> None:
    response = _call(api, route, api.auth(tenant, role))
    allowed = role in ROUTES[route][2]
    if not allowed:
        expected = (403, "forbidden")
    elif route in _JOB_ROUTES and tenant != OWNER:
        expected = (404, "unknown_job")  # another tenant's job: its existence is not revealed
    else:
        expected = (_SUCCESS[route], None)
    assert response.status_code == expected[0], response.text
    if expected[1]:
        assert response.json()["error"]["code"] == expected[1]
    if route == "query_jobs" and allowed:
        # Many jobs at once: another tenant's job reads as unknown there too
        [job] = response.json()["jobs"]
        assert ("status" in job) == (tenant == OWNER), job


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer iq_0123456789abcdef_" + "x" * 43}, {"Authorization": "Basic dXNlcjpwYXNz"}],
    ids=["no-key", "unknown-key", "not-bearer"],
)
def test_no_key_or_a_bad_key_is_401(api: Api, route: str, headers: dict[str, str]) -> None:
    response = _call(api, route, headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_missing_job_and_another_tenants_job_answer_alike(api: Api) -> None:
    job_id = _submit(api, OWNER)
    theirs = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(OTHER, "read"))
    missing = api.client.get(f"/v1/jobs/{'0' * 32}", headers=api.auth(OTHER, "read"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "unknown_job"


def test_waiting_on_another_tenants_job_answers_unknown_at_once(api: Api) -> None:
    # Given a queued job (no worker runs here), read by another tenant asking to wait for it
    job_id = _submit(api, OWNER)
    started = time.monotonic()
    theirs = api.client.get(f"/v1/jobs/{job_id}", params={"wait_s": 30}, headers=api.auth(OTHER, "read"))
    # Then it is unknown to them, without being held for the wait; its owner still sees it queued
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "unknown_job"
    assert time.monotonic() - started < 10
    mine = api.client.get(f"/v1/jobs/{job_id}", params={"wait_s": 0.2}, headers=api.auth(OWNER, "read"))
    assert mine.status_code == 200 and mine.json()["status"] == "queued"


def test_health_probes_stay_open(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    # No key needed; with no worker running it says so (503 no_consumer), never 401
    assert api.client.get("/readyz").json()["error"]["code"] == "no_consumer"


def test_idempotency_keys_are_per_tenant(api: Api) -> None:
    first = _submit(api, OWNER, **{"Idempotency-Key": "ACC-2024-0001"})
    again = _submit(api, OWNER, **{"Idempotency-Key": "ACC-2024-0001"})
    theirs = _submit(api, OTHER, **{"Idempotency-Key": "ACC-2024-0001"})
    assert first == again and theirs != first
    # The key itself is nowhere in Redis: only its hash names the idempotency record.
    assert b"ACC-2024-0001" not in dump_redis(api.redis_url)


def test_a_new_key_works_and_a_revoked_key_stops_without_a_restart(api: Api) -> None:
    issued = api.store.create("east", frozenset({"read"}))
    headers = {"Authorization": f"Bearer {issued.key}"}
    assert api.client.get("/v1/models", headers=headers).status_code == 200
    assert api.store.revoke(issued.principal.key_id) is True
    assert api.client.get("/v1/models", headers=headers).status_code == 401
    assert api.store.revoke(issued.principal.key_id) is False


def test_keys_are_stored_hashed_only(api: Api) -> None:
    dump = dump_redis(api.redis_url)
    assert b"inferq:apikey:" in dump
    for key in api.keys.values():
        secret = key.split("_", 2)[2]  # iq_<key id>_<secret>; the secret itself may hold "_"
        assert key.encode() not in dump and secret.encode() not in dump
    listed = api.store.list()
    assert {row["tenant"] for row in listed} == set(TENANTS)
    assert all(set(row) == {"key_id", "tenant", "roles", "created_at"} for row in listed)


def test_roles_and_tenants_are_validated() -> None:
    assert parse_roles("submit, read") == {"submit", "read"}
    for bad in ("", "root", "read,write"):
        with pytest.raises(InvalidRequest):
            parse_roles(bad)
    store = ApiKeyStore(redis.Redis())  # never reached: the tenant is refused first
    with pytest.raises(InvalidRequest):
        store.create("Bad Tenant!", frozenset({"read"}))


def test_docs_follow_the_setting(redis_url: str) -> None:
    for api in make_api(redis_url, api_docs_enabled=False):
        assert api.client.get("/docs").status_code == 404
        assert api.client.get("/openapi.json").status_code == 404
    for api in make_api(redis_url):
        assert api.client.get("/docs").status_code == 200
        security = api.client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert security["HTTPBearer"]["scheme"] == "bearer"
