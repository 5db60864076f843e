"""The completion hub and long-poll waiting, in-process against a real Redis: a waiter reads the job record once
before sleeping and once per wake-up, never in a loop; a completion is never missed; a Redis restart is survived."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from inferq.producers.redis_server import EmbeddedRedis
from inferq.producers.waiting import CompletionHub, prefer_wait_s, wait_for_jobs
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.jobs import JobStatus, Outcome, new_job_id
from inferq.protocol.keys import job_key


class CountingReader:
    """The hub's read function over a real job store, counting how often it is called."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.calls = 0

    async def __call__(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        self.calls += 1
        return await asyncio.to_thread(self.stores.jobs.views, job_ids)


def _queued_job(stores: Stores) -> str:
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "fraud", "model_version": "1", "blob_ref": "b"})
    return job_id


def _finish(stores: Stores, job_id: str) -> None:
    token = stores.jobs.claim_result(stores.jobs.claim(job_id, node="t", pid=1, lease_s=30)).token
    stores.jobs.finish([Outcome(job_id, token, JobStatus.SUCCEEDED, result={"score": 1})])


async def _with_hub(url: str, body: Callable[[CompletionHub], Awaitable[None]]) -> None:
    hub = CompletionHub(url)
    await hub.start()
    try:
        await _until(lambda: hub.subscribed)
        await body(hub)
    finally:
        await hub.stop()


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def test_a_waiter_wakes_on_completion_after_exactly_two_reads(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    reader = CountingReader(stores)
    job_id = _queued_job(stores)

    async def scenario(hub: CompletionHub) -> None:
        waiting = asyncio.create_task(wait_for_jobs(hub, reader, [job_id], wait_s=60))
        await _until(lambda: reader.calls == 1)
        await asyncio.to_thread(_finish, stores, job_id)
        [view] = await waiting
        assert view is not None and view["status"] == "succeeded" and view["result"] == {"score": 1}

    asyncio.run(_with_hub(redis_url, scenario))
    assert reader.calls == 2  # once before sleeping, once after the wake-up: no polling in between
    stores.text.close()


def test_a_waiter_gives_up_after_wait_s_with_one_read_and_the_current_state(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    reader = CountingReader(stores)
    job_id = _queued_job(stores)

    async def scenario(hub: CompletionHub) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        [view] = await wait_for_jobs(hub, reader, [job_id], wait_s=1.0)
        assert view is not None and view["status"] == "queued"
        assert loop.time() - started >= 1.0

    asyncio.run(_with_hub(redis_url, scenario))
    assert reader.calls == 1
    stores.text.close()


def test_an_already_final_or_unknown_job_answers_at_once_without_waiting(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    reader = CountingReader(stores)
    done = _queued_job(stores)
    _finish(stores, done)

    async def scenario(hub: CompletionHub) -> None:
        views = await wait_for_jobs(hub, reader, [done, "unknown-id"], wait_s=600)
        assert views[0] is not None and views[0]["status"] == "succeeded"
        assert views[1] is None

    asyncio.run(_with_hub(redis_url, scenario))
    assert reader.calls == 1


def test_many_jobs_wait_for_all_or_for_any(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    reader = CountingReader(stores)
    first, second = _queued_job(stores), _queued_job(stores)

    async def scenario(hub: CompletionHub) -> None:
        all_of = asyncio.create_task(wait_for_jobs(hub, reader, [first, second], wait_s=60, until="all"))
        any_of = asyncio.create_task(wait_for_jobs(hub, reader, [first, second], wait_s=60, until="any"))
        await _until(lambda: reader.calls == 2)
        await asyncio.to_thread(_finish, stores, first)
        views = await any_of
        assert [v["status"] for v in views if v] == ["succeeded", "queued"]
        assert not all_of.done()
        await asyncio.to_thread(_finish, stores, second)
        assert [v["status"] for v in await all_of if v] == ["succeeded", "succeeded"]

    asyncio.run(_with_hub(redis_url, scenario))
    stores.text.close()


def test_waiters_survive_a_redis_restart_and_see_a_completion_made_while_it_was_down(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        stores = open_stores(server.url, queued_ttl_s=3600, result_ttl_s=60)
        reader = CountingReader(stores)
        job_id = _queued_job(stores)

        async def scenario(hub: CompletionHub) -> None:
            waiting = asyncio.create_task(wait_for_jobs(hub, reader, [job_id], wait_s=60))
            await _until(lambda: reader.calls == 1)
            server.stop()
            await _until(lambda: not hub.subscribed)
            await asyncio.to_thread(server.start)  # same port, same append-only file: the job is still there
            await asyncio.to_thread(_finish, stores, job_id)
            [view] = await waiting
            assert view is not None and view["status"] == "succeeded"

        asyncio.run(_with_hub(server.url, scenario))
        stores.text.close()


def test_a_completion_whose_message_was_lost_is_read_when_the_subscription_comes_back(redis_url: str) -> None:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    reader = CountingReader(stores)
    job_id = _queued_job(stores)

    async def scenario(hub: CompletionHub) -> None:
        waiting = asyncio.create_task(wait_for_jobs(hub, reader, [job_id], wait_s=60))
        await _until(lambda: reader.calls == 1)
        # The record ends without a message reaching the hub (as when it was published while the hub was away)...
        stores.text.hset(job_key(job_id), mapping={"status": "succeeded", "result": "{}"})
        # ...then the hub's connection drops and it subscribes again: every waiter reads again.
        assert stores.text.client_kill_filter(_type="pubsub") >= 1
        [view] = await waiting
        assert view is not None and view["status"] == "succeeded"

    asyncio.run(_with_hub(redis_url, scenario))
    assert reader.calls == 2
    stores.text.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("wait=10", 10.0),
        ("respond-async, wait=5", 5.0),
        ("WAIT = 7 ; foo=bar", 7.0),
        ('wait="3"', 3.0),
        ("wait=-1", None),
        ("wait=soon", None),
        ("return=minimal", None),
    ],
)
def test_the_prefer_header_is_read_as_rfc_7240_says(header: str | None, expected: float | None) -> None:
    assert prefer_wait_s(header) == expected
