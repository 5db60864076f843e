"""Authentication and authorisation for the HTTP API, as FastAPI dependencies, so routes only name a role.

    no key, a malformed, unknown or revoked key   401 unauthorized (with `WWW-Authenticate: Bearer`)
    a valid key whose roles do not allow the call  403 forbidden
    a job of another tenant                        404 unknown_job, exactly as for a job that does not exist

Roles: `submit` submits and cancels jobs, `read` reads jobs and models, `admin` does both; every key acts within
its own tenant only. The principal is left on the request for the access log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from inferq.producers.api_keys import ApiKeyStore, Principal
from inferq.protocol.errors import Forbidden, Unauthorized, UnknownJob
from inferq.protocol.jobs import JobStore

PRINCIPAL_STATE = "principal"
_bearer = HTTPBearer(auto_error=False, description="An API key from `inferq keys create`.")


def _store(request: Request) -> ApiKeyStore:
    store: ApiKeyStore = request.app.state.api_keys
    return store


def require_role(*roles: str) -> Callable[..., object]:
    """A dependency that authenticates the request and lets it through if the key has one of `roles`."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        if credentials is None:
            raise Unauthorized("send an API key as 'Authorization: Bearer KEY'")
        principal = await run_in_threadpool(_store(request).authenticate, credentials.credentials)
        setattr(request.state, PRINCIPAL_STATE, principal)
        if not principal.may(*roles):
            raise Forbidden(f"this API key's roles do not allow this call (needs one of: {', '.join(roles)})")
        return principal

    return dependency


Submitter = Annotated[Principal, Depends(require_role("submit"))]
Reader = Annotated[Principal, Depends(require_role("read"))]


def require_own_job(jobs: JobStore, principal: Principal, job_id: str) -> None:
    """Refuse a job of another tenant as if it did not exist: its existence is not revealed."""
    # The tenant field alone: the route reads the whole job next, once.
    if jobs.tenants([job_id]) != [principal.tenant]:
        raise UnknownJob(f"no job with id {job_id!r}")
