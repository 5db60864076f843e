"""Log lines of every inferq process: one JSON object per event, or plain text for people (`log_format`).

A line carries `job_id`, `model` and `tenant` where they are known: from the record's `extra` (`log.info(...,
extra={"job_id": ...})`) or from the context bound around the work (`bind_context`: a Celery task binds its job id
and model; an API request its tenant). Nothing from an upload is ever logged: messages name jobs by id, and an
exception is logged by its type and frames, never its message, which may quote file contents.

Installed once per process: `configure_logging` for the API, the reconciler and tools, and Celery's
`after_setup_logger` / `after_setup_task_logger` signals for worker and callback nodes (`connect_celery_logging`).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

from inferq.config import Settings
from inferq.protocol.keys import TASK_PREFIX

CONTEXT_FIELDS = ("job_id", "model", "tenant")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_context: ContextVar[dict[str, str]] = ContextVar("inferq_log_context", default={})  # noqa: B039 - never mutated
_INSTALLED = "_inferq_handler"


class JsonFormatter(logging.Formatter):
    """One line of JSON per record: ts, level, logger, message, pid, then job_id/model/tenant where known."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        bound = _context.get()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None) or bound.get(name)
            if value:
                line[name] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["frames"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(line, separators=(",", ":"), default=str)


def formatter_for(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(_TEXT_FORMAT)


def configure_logging(settings: Settings) -> None:
    """Send this process's logs to standard error in the configured format; a second call changes nothing."""
    root = logging.getLogger()
    if any(getattr(handler, _INSTALLED, False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(settings))
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


@contextmanager
def bind_context(**fields: str | None) -> Iterator[None]:
    """Add job_id/model/tenant to every line logged inside the block (in this thread or task)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def connect_celery_logging(settings: Settings) -> None:
    """In a Celery node: format its loggers' lines, and bind each task's job id and model while it runs."""

    def _format(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.setFormatter(formatter_for(settings))

    def _bind(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        name = str(getattr(task, "name", ""))
        model = name.removeprefix(f"{TASK_PREFIX}.") if name.startswith(f"{TASK_PREFIX}.") else None
        # Every inferq task's first argument is the job id (an inference task's Celery id is the job id too).
        job_id = str(args[0]) if args else task_id
        _context.set({"job_id": job_id, **({"model": model} if model else {})})

    def _unbind(**_: Any) -> None:
        _context.set({})

    after_setup_logger.connect(_format, weak=False)
    after_setup_task_logger.connect(_format, weak=False)
    task_prerun.connect(_bind, weak=False)
    task_postrun.connect(_unbind, weak=False)


__all__ = ["JsonFormatter", "bind_context", "configure_logging", "connect_celery_logging", "formatter_for"]
