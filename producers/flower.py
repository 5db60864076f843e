"""Flower, never open: basic auth from the settings, and its control API switched off.

Flower's HTTP API can shut workers down, resize and restart their pools, add and cancel consumers, revoke,
rate-limit and time-limit tasks, and send arbitrary tasks with arbitrary arguments. Basic auth has a single role,
so anyone who may look could also do all of that; inferq removes those routes before Flower starts, leaving a
read-only dashboard (the UI's control buttons then answer 404). Operators control workers with
`celery -A inferq.producers.celery_app control ...` from a host that holds the Redis password.

The credentials reach Flower through its `FLOWER_BASIC_AUTH` environment variable, never a command line that
`ps` would show.

Flower keeps its state across restarts, but not the way its persistent mode does (a `shelve` file, which is
pickle): the Celery events it receives are journalled as JSON in a capped Redis stream, and a restarted Flower
replays them into a fresh state, which is how Flower builds its state from live events in the first place.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import redis

from inferq.config import Settings
from inferq.protocol.connections import redis_client
from inferq.protocol.errors import ConfigError
from inferq.protocol.keys import flower_journal_key

log = logging.getLogger(__name__)

# Flower's own state-save timer writes the journal this often (ms); a crash loses at most this much.
_JOURNAL_EVERY_MS = 1000
_REPLAY_PAGE = 1000

# Route patterns of Flower 2.x (flower/urls.py) that change state; the read-only API (workers, tasks, task info
# and results, queue lengths) stays.
CONTROL_ROUTE_PREFIXES = (
    r"/api/worker/shutdown/",
    r"/api/worker/pool/",
    r"/api/worker/queue/",
    r"/api/task/apply/",
    r"/api/task/async-apply/",
    r"/api/task/send-task/",
    r"/api/task/abort/",
    r"/api/task/timeout/",
    r"/api/task/rate-limit/",
    r"/api/task/revoke/",
)


def _pattern(handler: object) -> str:
    if isinstance(handler, tuple):
        return str(handler[0])
    return str(getattr(getattr(handler, "regex", None), "pattern", ""))


def remove_control_routes() -> list[str]:
    """Drop Flower's state-changing routes from its handler table, in place (Flower reads the same list when
    it builds its application). Returns the patterns removed."""
    from flower import urls

    removed = [_pattern(h) for h in urls.handlers if _pattern(h).startswith(CONTROL_ROUTE_PREFIXES)]
    urls.handlers[:] = [h for h in urls.handlers if not _pattern(h).startswith(CONTROL_ROUTE_PREFIXES)]
    return removed


def basic_auth(settings: Settings) -> str:
    credentials = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    user, _, password = credentials.partition(":")
    if not user or not password:
        raise ConfigError(
            "Flower is never served without a login: set INFERQ_FLOWER_BASIC_AUTH=user:password "
            "(or flower_basic_auth in the settings file)"
        )
    return credentials


def journalled_events(settings: Settings) -> type:
    """Flower's event capture (`flower.events.Events`) with its state kept in a Redis stream of the events as
    JSON, replayed on start; installed in place of Flower's own before it starts."""
    from flower.events import Events

    client = redis_client(settings.redis_url_or_default, decode=True, ca_file=settings.redis_tls_ca_file)
    key, keep = flower_journal_key(), settings.flower_journal_events

    class JournalledEvents(Events):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._pending: list[str] = []
            self._pending_lock = threading.Lock()
            kwargs.update(persistent=True, state_save_interval=_JOURNAL_EVERY_MS)
            super().__init__(*args, **kwargs)
            replayed = self._replay()
            log.info("Flower state restored from %d journalled events", replayed)

        def load_state(self) -> None:
            return None  # Flower then makes a fresh state, which `_replay` fills

        def _replay(self) -> int:
            count, start = 0, "-"
            try:
                while page := _page(client, key, start):
                    for _entry_id, fields in page:
                        self._replay_one(fields.get("event", ""))
                        count += 1
                    start = "(" + page[-1][0]
            except redis.RedisError as e:
                log.warning("Flower state not restored (%s); it fills from live events", type(e).__name__)
            return count

        def _replay_one(self, text: str) -> None:
            try:
                self.state.event(json.loads(text))
            except (ValueError, KeyError, TypeError):
                log.warning("a journalled Flower event could not be replayed; skipped")

        def on_event(self, event: dict[str, Any]) -> None:
            with self._pending_lock:
                self._pending.append(json.dumps(event, default=str))
            super().on_event(event)

        def save_state(self) -> None:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            pipe = client.pipeline(transaction=False)
            for text in pending:
                pipe.xadd(key, {"event": text}, maxlen=keep, approximate=True)
            try:
                pipe.execute()
            except redis.RedisError as e:
                log.warning("Flower journal not written (%s); retried at the next save", type(e).__name__)
                with self._pending_lock:
                    self._pending[:0] = pending[-keep:]

    return JournalledEvents


def _page(client: redis.Redis, key: str, start: str) -> list[tuple[str, dict[str, str]]]:
    page: list[tuple[str, dict[str, str]]] = client.xrange(key, min=start, count=_REPLAY_PAGE)  # type: ignore[assignment]
    return page


def run_flower(settings: Settings) -> None:
    """Serve Flower in this process (Ctrl-C and service managers reach it) until it stops."""
    credentials = basic_auth(settings)
    from flower import app as flower_app

    from inferq.producers.celery_app import app

    remove_control_routes()
    flower_app.Events = journalled_events(settings)
    os.environ["FLOWER_BASIC_AUTH"] = credentials
    app.start(["flower", *flower_options(settings)])


# Every worker node's name carries its process id, so a restarted node is a new worker: forget offline ones.
_PURGE_OFFLINE_WORKERS_S = 3600


def flower_options(settings: Settings) -> list[str]:
    """Flower's command-line options. Not its own persistent mode (a `shelve` file: pickle): `journalled_events`
    keeps the state instead. Each task is named `inferq.infer.<model>` (`inferq.infer_many.<model>` for a chunk of
    a bulk submission)."""
    return [
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        f"--purge_offline_workers={_PURGE_OFFLINE_WORKERS_S}",
    ]
