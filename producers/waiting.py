"""Waiting for jobs without polling: one pub/sub subscriber per API process wakes the requests that wait.

Every transition of a job to a final state PUBLISHes its id on `done_channel()`. `CompletionHub` holds one
subscription (one Redis connection, however many requests wait) and a map job id -> watches. A request registers
its watch first, then reads the job records, then sleeps until woken or out of time, and reads again what woke
it: a completion between the read and the sleep still wakes it, so none is missed. Whenever the subscription is
(re)established every watch is woken to read again, because messages published while it was down are lost.
The answer is always what the job record says; a wake-up only says when to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal

import redis
import redis.asyncio as aredis

from inferq.protocol.jobs import JobStatus
from inferq.protocol.keys import done_channel

log = logging.getLogger(__name__)

JobView = dict[str, Any]
ReadJobs = Callable[[list[str]], Awaitable[list[JobView | None]]]
Until = Literal["all", "any"]

_RECONNECT_FIRST_S = 0.1
_RECONNECT_MAX_S = 5.0
_CONNECT_TIMEOUT_S = 5.0
# RFC 7240: `Prefer: wait=N` (delta-seconds), among other comma-separated preferences with optional parameters.
_PREFER_WAIT = re.compile(r"^\s*wait\s*=\s*\"?(\d{1,9})\"?\s*$", re.IGNORECASE)


class Watch:
    """One waiting request's view of the hub: which of its jobs were announced since it last looked."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.job_ids = frozenset(job_ids)
        self._woken: set[str] = set()
        self._recheck_all = False
        self._event = asyncio.Event()

    def wake(self, job_id: str) -> None:
        self._woken.add(job_id)
        self._event.set()

    def wake_all(self) -> None:
        self._recheck_all = True
        self._event.set()

    async def next(self, timeout_s: float) -> set[str]:
        """The job ids to read again, once any is announced or `timeout_s` has passed (then maybe none)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
        self._event.clear()
        woken, self._woken = self._woken, set()
        if self._recheck_all:
            self._recheck_all = False
            return set(self.job_ids)
        return woken


class CompletionHub:
    """The API process's one subscription to `done_channel()`, fanned out to the watches of waiting requests."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._watches: dict[str, set[Watch]] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = False
        # Requests waiting now, for the API's metrics: parked requests cost no CPU, but each holds a connection.
        self.waiting = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="inferq-completion-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def watch(self, job_ids: Sequence[str]) -> Iterator[Watch]:
        watch = Watch(job_ids)
        for job_id in watch.job_ids:
            self._watches.setdefault(job_id, set()).add(watch)
        self.waiting += 1
        try:
            yield watch
        finally:
            self.waiting -= 1
            for job_id in watch.job_ids:
                watchers = self._watches.get(job_id)
                if watchers is not None:
                    watchers.discard(watch)
                    if not watchers:
                        del self._watches[job_id]

    def announce(self, job_id: str) -> None:
        for watch in self._watches.get(job_id, ()):
            watch.wake(job_id)

    def _wake_everyone(self) -> None:
        for watchers in self._watches.values():
            for watch in watchers:
                watch.wake_all()

    async def _listen_forever(self) -> None:
        delay_s = _RECONNECT_FIRST_S
        while True:
            try:
                await self._listen_once()
            except (redis.RedisError, OSError) as e:
                log.warning("completion subscription lost (%s); reconnecting in %.1f s", type(e).__name__, delay_s)
            self.subscribed = False
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _RECONNECT_MAX_S)

    async def _listen_once(self) -> None:
        client = aredis.Redis.from_url(
            self._redis_url, decode_responses=True, socket_connect_timeout=_CONNECT_TIMEOUT_S, socket_keepalive=True
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(done_channel())
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["type"] == "message":
                    self.announce(str(message["data"]))
                elif message["type"] == "subscribe":
                    # Also sent when redis-py reconnects and resubscribes on its own: anything may have been missed.
                    self.subscribed = True
                    self._wake_everyone()
        finally:
            self.subscribed = False
            await pubsub.aclose()
            await client.aclose()


def is_final(view: JobView | None) -> bool:
    """A job that ended, or that does not exist (nothing more will happen to it)."""
    return view is None or JobStatus(view["status"]).is_final


def _satisfied(views: dict[str, JobView | None], until: Until) -> bool:
    finals = [is_final(v) for v in views.values()]
    return all(finals) if until == "all" else any(finals)


async def wait_for_jobs(
    hub: CompletionHub, read: ReadJobs, job_ids: Sequence[str], *, wait_s: float, until: Until = "all"
) -> list[JobView | None]:
    """The jobs' views once all (or any) of them are final, or after `wait_s` as they are then."""
    unique = list(dict.fromkeys(job_ids))
    if wait_s <= 0:  # a plain read: no watch to register, and not counted as waiting
        views = dict(zip(unique, await read(unique), strict=True))
        return [views[job_id] for job_id in job_ids]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    with hub.watch(unique) as watch:
        # Registered before the first read: a completion from here on wakes the watch.
        views = dict(zip(unique, await read(unique), strict=True))
        while unique and not _satisfied(views, until):
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            stale = [job_id for job_id in await watch.next(remaining_s) if not is_final(views[job_id])]
            if stale:
                views.update(zip(stale, await read(stale), strict=True))
    return [views[job_id] for job_id in job_ids]


def prefer_wait_s(prefer: str | None) -> float | None:
    """The `wait` preference of an RFC 7240 `Prefer` header in seconds, or None; other preferences are ignored,
    as the RFC asks of preferences a server does not support."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        match = _PREFER_WAIT.match(preference.split(";", 1)[0])
        if match:
            return float(match.group(1))
    return None
