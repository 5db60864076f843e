"""The access log: who did what to which job, when; never a query string, a raw path or patient data."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from inferq.producers.access_log import ACCESS_LOGGER, configure_access_log
from tests.producers.conftest import Api, fraud_inputs


def _lines(caplog: pytest.LogCaptureFixture, *, at_least: int = 0) -> list[dict[str, object]]:
    # The server thread writes its line as the response ends, which may be just after the client has it.
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_each_request_leaves_one_line_naming_key_tenant_action_and_job(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    submitted = api.client.post(
        "/v1/models/fraud/jobs", json={"inputs": fraud_inputs()}, headers=api.auth("north", "submit")
    )
    job_id = submitted.json()["job_id"]
    api.client.get(f"/v1/jobs/{job_id}?patient=DOE^JOHN", headers=api.auth("north", "read"))
    api.client.get(f"/v1/jobs/{job_id}", headers=api.auth("south", "read"))
    api.client.post("/v1/models/JOHN-DOE-1970/jobs", json={}, headers=api.auth("north", "submit"))
    api.client.get("/healthz")
    submit, read, foreign, unknown_model = _lines(caplog, at_least=4)
    north_submit = api.keys[("north", "submit")].split("_")[1]
    assert submit["key_id"] == north_submit and submit["tenant"] == "north"
    assert submit["action"] == "submit_job" and submit["job_id"] == job_id and submit["model"] == "fraud"
    assert submit["status"] == 202 and submit["method"] == "POST" and str(submit["ts"]).endswith("Z")
    assert read["action"] == "get_job" and read["job_id"] == job_id and read["route"] == "/v1/jobs/{job_id}"
    assert foreign["tenant"] == "south" and foreign["status"] == 404
    assert unknown_model["model"] is None and unknown_model["status"] == 404
    text = caplog.text
    for secret in ("DOE", "JOHN", "patient", *api.keys.values()):
        assert secret not in text


def test_a_request_without_a_key_is_logged_as_anonymous(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    api.client.get("/v1/models")
    [line] = _lines(caplog, at_least=1)
    assert line["key_id"] is None and line["tenant"] is None and line["status"] == 401


def test_the_access_log_goes_to_its_file_as_bare_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    configure_access_log(path)
    logger = logging.getLogger(ACCESS_LOGGER)
    try:
        logger.info(json.dumps({"action": "get_job"}))
        assert json.loads(path.read_text().splitlines()[0]) == {"action": "get_job"}
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = True
