"""Flower, never open: basic auth from the settings, and its control API switched off.

Flower's HTTP API can shut workers down, resize and restart their pools, add and cancel consumers, revoke,
rate-limit and time-limit tasks, and send arbitrary tasks with arbitrary arguments. Basic auth has a single role,
so anyone who may look could also do all of that; inferq removes those routes before Flower starts, leaving a
read-only dashboard (the UI's control buttons then answer 404). Operators control workers with
`celery -A inferq.producers.celery_app control ...` from a host that holds the Redis password.

The credentials reach Flower through its `FLOWER_BASIC_AUTH` environment variable, never a command line that
`ps` would show.
"""

from __future__ import annotations

import os

from inferq.config import Settings
from inferq.protocol.errors import ConfigError

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


def run_flower(settings: Settings) -> None:
    """Serve Flower in this process (Ctrl-C and service managers reach it) until it stops."""
    credentials = basic_auth(settings)
    from inferq.producers.celery_app import app

    remove_control_routes()
    os.environ["FLOWER_BASIC_AUTH"] = credentials
    app.start(["flower", *flower_options(settings)])


# Every worker node's name carries its process id, so a restarted node is a new worker: forget offline ones.
_PURGE_OFFLINE_WORKERS_S = 3600


def flower_options(settings: Settings) -> list[str]:
    """Flower's command-line options. Not its persistent mode: Flower stores that state with `shelve`, which is
    pickle, and inferq loads nothing with pickle; after a restart Flower rebuilds its view from live events, and the
    job records (the source of truth) lose nothing. Each task is named `inferq.infer.<model>`."""
    return [
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        f"--purge_offline_workers={_PURGE_OFFLINE_WORKERS_S}",
    ]
