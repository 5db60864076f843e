"""Operator commands that work on the job store directly: the reconciler loop and the dead-letter list."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

from inferq.config import Settings
from inferq.producers.reconciler import Reconciler
from inferq.protocol.celery_config import build_celery
from inferq.protocol.connections import stores_for
from inferq.protocol.jobs import JobStore
from inferq.protocol.keys import dead_letter_key, job_key
from inferq.protocol.logs import configure_logging
from inferq.protocol.registry import load_registry

log = logging.getLogger(__name__)

# What the dead-letter list shows of a job: nothing from the upload, nothing a patient could be found by.
_SHOWN_FIELDS = (
    "model",
    "model_version",
    "attempts",
    "lost",
    "media_type",
    "input_kind",
    "submitted_at",
    "finished_at",
)


def build_reconciler(settings: Settings) -> Reconciler:
    registry = load_registry(settings.registry_path)
    return Reconciler(settings, registry, stores_for(settings), build_celery(settings, registry))


def run_reconciler(settings: Settings, *, once: bool) -> int:
    configure_logging(settings)
    reconciler = build_reconciler(settings)
    if once:
        print(json.dumps(dict(reconciler.tick(check_lost=True))))
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("reconciler running every %.1f s", settings.reconcile_interval_s)
    reconciler.run(stop)
    return 0


def dead_letter_rows(settings: Settings) -> list[dict[str, Any]]:
    stores = stores_for(settings)
    rows = []
    for job_id in stores.jobs.dead_letters():
        fields: dict[str, str] = stores.text.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not fields:
            continue
        error = json.loads(fields.get("error") or "null") or {}
        since_s = stores.text.zscore(dead_letter_key(), job_id)
        row = {"job_id": job_id, **{k: fields.get(k) for k in _SHOWN_FIELDS}, "error_code": error.get("code")}
        rows.append({**row, "dead_lettered_at": since_s})
    return rows


def requeue_dead_letters(settings: Settings, job_ids: list[str], *, everything: bool) -> dict[str, str]:
    reconciler = build_reconciler(settings)
    jobs: JobStore = stores_for(settings).jobs
    outcomes = {}
    for job_id in jobs.dead_letters() if everything else job_ids:
        outcome = jobs.requeue_dead(job_id)
        if outcome == "ok":
            reconciler.publish(job_id)
        outcomes[job_id] = outcome
    return outcomes
