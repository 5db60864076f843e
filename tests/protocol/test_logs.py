"""Structured log lines: one JSON object per record, with the job's id and model where known, never an
exception's message."""

from __future__ import annotations

import json
import logging

from inferq.config import Settings
from inferq.protocol.logs import JsonFormatter, bind_context, formatter_for


def _record(message: str, *args: object, exc: BaseException | None = None, **extra: str) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    record = logging.LogRecord("inferq.test", logging.INFO, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_line_is_json_with_the_bound_job_and_model() -> None:
    with bind_context(job_id="abc123", model="fraud", tenant="north"):
        line = JsonFormatter().format(_record("job %s recorded %s", "abc123", "succeeded"))
    parsed = json.loads(line)
    assert parsed["message"] == "job abc123 recorded succeeded"
    assert (parsed["job_id"], parsed["model"], parsed["tenant"]) == ("abc123", "fraud", "north")
    assert parsed["level"] == "INFO" and parsed["logger"] == "inferq.test"
    outside = json.loads(JsonFormatter().format(_record("idle")))
    assert "job_id" not in outside and "tenant" not in outside


def test_extra_fields_win_and_an_exception_shows_its_type_not_its_message() -> None:
    name = "^".join(("DOE", "JANE"))  # built at run time, so the frame's source line does not quote it
    try:
        raise ValueError(f"PatientName={name}")
    except ValueError as e:
        line = JsonFormatter().format(_record("decode failed", exc=e, job_id="j1"))
    parsed = json.loads(line)
    assert parsed["job_id"] == "j1" and parsed["exc_type"] == "ValueError"
    assert "DOE^JANE" not in line


def test_text_format_for_people() -> None:
    formatter = formatter_for(Settings(log_format="text"))
    assert not isinstance(formatter, JsonFormatter)
    assert "inferq.test: hello" in formatter.format(_record("hello"))
