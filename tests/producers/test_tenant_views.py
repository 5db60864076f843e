"""What a tenant sees of the queues and of its jobs: its own, never another tenant's, not even their number."""

from __future__ import annotations

from tests.producers.conftest import Api, fraud_inputs


def _submit(api: Api, tenant: str, model: str = "fraud") -> str:
    response = api.client.post(
        f"/v1/models/{model}/jobs", json={"inputs": fraud_inputs()}, headers=api.auth(tenant, "submit")
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def test_queue_depths_count_only_the_callers_own_waiting_jobs(api: Api) -> None:
    # Given north with three waiting fraud jobs and south with one (no worker runs here: they stay queued)
    north = [_submit(api, "north") for _ in range(3)]
    _submit(api, "south")
    # Then each tenant's model list counts its own only
    for tenant, expected in (("north", 3), ("south", 1)):
        models = {m["name"]: m for m in api.client.get("/v1/models", headers=api.auth(tenant, "read")).json()["models"]}
        assert models["fraud"]["queue_depth"] == expected and models["chest-xray"]["queue_depth"] == 0
        one = api.client.get("/v1/models/fraud", headers=api.auth(tenant, "read")).json()
        assert one["queue_depth"] == expected
    # And a cancelled job no longer waits
    assert api.client.delete(f"/v1/jobs/{north[0]}", headers=api.auth("north", "submit")).status_code == 200
    depth = api.client.get("/v1/models/fraud", headers=api.auth("north", "read")).json()["queue_depth"]
    assert depth == 2


def test_a_tenant_lists_its_own_jobs_newest_first_with_filters(api: Api) -> None:
    north = [_submit(api, "north") for _ in range(3)]
    south = _submit(api, "south")
    api.client.delete(f"/v1/jobs/{north[1]}", headers=api.auth("north", "submit"))
    listed = api.client.get("/v1/jobs", headers=api.auth("north", "read")).json()["jobs"]
    assert [job["job_id"] for job in listed] == north[::-1] and south not in {job["job_id"] for job in listed}
    cancelled = api.client.get("/v1/jobs", params={"status": "cancelled"}, headers=api.auth("north", "read")).json()
    assert [job["job_id"] for job in cancelled["jobs"]] == [north[1]]
    page = api.client.get("/v1/jobs", params={"limit": 1}, headers=api.auth("north", "read")).json()["jobs"]
    assert [job["job_id"] for job in page] == [north[2]]
    assert api.client.get("/v1/jobs", params={"model": "nope"}, headers=api.auth("north", "read")).status_code == 404
    assert api.client.get("/v1/jobs", headers=api.auth("north", "submit")).status_code == 403
