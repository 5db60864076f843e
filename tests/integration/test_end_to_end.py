"""The whole path: HTTP submit → Redis → Celery worker → job record → HTTP poll, compared with `inferq predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq.producers.demo import fraud_example
from inferq.protocol.errors import RemoteError
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow
_JOB_TIMEOUT_S = 300.0


def _predict(stack: Stack, model: str, files: list[Path]) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "inferq.producers.cli", "predict", "--model", model, *map(str, files)]
    done = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _assert_same_result(served: dict[str, Any], local: dict[str, Any]) -> None:
    """Equal apart from float rounding (1e-5): same keys, labels, image facts and shapes."""
    assert served.keys() == local.keys()
    for key in served:
        if key == "findings":
            assert [f["label"] for f in served[key]] == [f["label"] for f in local[key]]
            for s, loc in zip(served[key], local[key], strict=True):
                assert s["probability"] == pytest.approx(loc["probability"], abs=1e-5)
        elif key == "outputs":
            assert served[key][0]["shape"] == local[key][0]["shape"]
            assert served[key][0]["data"] == pytest.approx(local[key][0]["data"], abs=1e-5)
        else:
            assert served[key] == local[key], key


def _wait_succeeded(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        job = client.result(job_id, wait_s=_JOB_TIMEOUT_S)
    assert job["status"] == "succeeded", job
    return job


def test_every_sample_kind_succeeds_with_the_same_result_as_predict(stack: Stack) -> None:
    # Given the sample X-rays (DICOM in several encodings, PNG 8/16-bit, JPEG)
    with stack.client() as client:
        job_ids = [client.submit("chest-xray", path) for path in stack.samples]
    # When they are served through the API and also predicted in-process
    served = [_wait_succeeded(stack, job_id) for job_id in job_ids]
    local = _predict(stack, "chest-xray", stack.samples)
    # Then every served result equals the in-process one, with 14 findings and no patient data
    assert len(local) == len(served) == len(stack.samples)
    for job, result in zip(served, local, strict=True):
        assert job["model"] == "chest-xray" and job["model_version"] == "0.1.0"
        assert job["started_at"] and job["finished_at"] and job["error"] is None
        assert job["attempts"] == 1  # claimed once: no redelivery or retry ran it a second time
        _assert_same_result(job["result"], result)
        assert len(result["findings"]) == 14 and result["trained"] is False
        assert all(0.0 < f["probability"] < 1.0 for f in result["findings"])
        assert "SYNTHETIC" not in json.dumps(job) and "DEMO-0001" not in json.dumps(job)


def test_a_bare_dicom_body_is_accepted_like_a_multipart_file(stack: Stack) -> None:
    dicom = stack.samples[0]
    response = httpx.post(
        f"{stack.api_url}/v1/models/chest-xray/jobs",
        content=dicom.read_bytes(),
        headers={**stack.auth, "content-type": "application/dicom", "inferq-priority": "3"},
    )
    assert response.status_code == 202, response.text
    job = _wait_succeeded(stack, response.json()["job_id"])
    [local] = _predict(stack, "chest-xray", [dicom])
    _assert_same_result(job["result"], local)


def test_a_fraud_tensor_job_matches_predict(stack: Stack) -> None:
    inputs = fraud_example(rows=4)
    with stack.client() as client:
        job = _wait_succeeded(stack, client.submit("fraud", inputs=inputs))
    request = stack.tmp / "fraud.json"
    request.write_text(json.dumps({"inputs": inputs}))
    [local] = _predict(stack, "fraud", [request])
    _assert_same_result(job["result"], local)
    assert job["result"]["outputs"][0]["shape"] == [4, 1]
    assert job["attempts"] == 1


def test_a_worker_started_the_plain_celery_way_serves_its_queue(stack: Stack) -> None:
    with stack.client() as client:
        job = _wait_succeeded(stack, client.submit("fraud-celery", inputs=fraud_example(rows=1)))
    assert job["model"] == "fraud-celery"


def test_unknown_model_and_unknown_job_are_404(stack: Stack) -> None:
    response = httpx.post(f"{stack.api_url}/v1/models/nope/jobs", files={"file": ("a.png", b"x")}, headers=stack.auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_model"
    response = httpx.get(f"{stack.api_url}/v1/jobs/0123456789abcdef", headers=stack.auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_job"


def test_a_non_image_upload_is_refused_and_the_worker_stays_up(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.api_url}/v1/models/chest-xray/jobs",
        files={"file": ("notes.txt", b"not an image at all")},
        headers=stack.auth,
    )
    assert response.status_code == 415
    assert response.json()["error"] == {
        "code": "unsupported_media_type",
        "message": response.json()["error"]["message"],
        "retryable": False,
    }
    assert not stack.services.dead()
    with stack.client() as client:
        _wait_succeeded(stack, client.submit("chest-xray", stack.samples[0]))


def test_an_image_that_fails_to_decode_fails_its_job_and_the_worker_stays_up(stack: Stack) -> None:
    # A PNG whose header is sound but whose image data is cut short passes intake and fails in the worker.
    png = next(p for p in stack.samples if p.name == "chest-8bit.png").read_bytes()
    truncated = png[: len(png) // 2]
    with stack.client() as client:
        job_id = client.submit("chest-xray", truncated, filename="cut.png")
        job = client.result(job_id, wait_s=_JOB_TIMEOUT_S)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "invalid_image" and job["error"]["retryable"] is False
        _wait_succeeded(stack, client.submit("chest-xray", stack.samples[0]))
    assert not stack.services.dead()


def test_no_patient_identifier_reaches_any_log(stack: Stack) -> None:
    # Given a DICOM with patient fields whose RLE pixel data is damaged (it passes intake, fails to decode)
    dicom = next(p for p in stack.samples if p.name == "chest-rle.dcm").read_bytes()
    damaged = bytearray(dicom)
    start = int(len(damaged) * 0.6)
    damaged[start : start + 2000] = b"\xff" * 2000
    with stack.client() as client:
        failed = client.result(client.submit("chest-xray", bytes(damaged), filename="x.dcm"), wait_s=_JOB_TIMEOUT_S)
        succeeded = _wait_succeeded(stack, client.submit("chest-xray", dicom))
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_image"
    # Then neither the job records nor any service's log carries the patient's name or id
    for text in [json.dumps(failed), json.dumps(succeeded), *map(stack.services.log_of, stack.services.processes)]:
        assert "SYNTHETIC" not in text and "DEMO-0001" not in text


def test_cancel_before_start_gives_cancelled(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit("fraud-idle", inputs=fraud_example(rows=1))
        assert client.status(job_id)["status"] == "queued"
        assert client.cancel(job_id)["status"] == "cancelled"
        assert client.cancel(job_id)["status"] == "cancelled"
        assert client.status(job_id)["status"] == "cancelled"


def test_a_finished_job_cannot_be_cancelled(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit("fraud", inputs=fraud_example(rows=1))
        _wait_succeeded(stack, job_id)
        with pytest.raises(RemoteError) as caught:
            client.cancel(job_id)
    assert caught.value.remote_code == "job_not_cancellable" and caught.value.remote_http_status == 409


def test_submit_answers_202_with_location_and_honours_the_idempotency_key(stack: Stack) -> None:
    body = {"inputs": fraud_example(rows=1), "priority": 5, "callback_url": "https://example.invalid/hook"}
    url = f"{stack.api_url}/v1/models/fraud/jobs"
    first = httpx.post(url, json=body, headers={**stack.auth, "Idempotency-Key": "tx-42"})
    again = httpx.post(url, json=body, headers={**stack.auth, "Idempotency-Key": "tx-42"})
    assert first.status_code == again.status_code == 202
    accepted = first.json()
    assert set(accepted) == {"job_id", "status", "status_url"} and accepted["status"] == "queued"
    assert first.headers["location"] == accepted["status_url"]
    assert accepted["status_url"].endswith(f"/v1/jobs/{accepted['job_id']}")
    assert again.json()["job_id"] == accepted["job_id"] and again.headers["idempotent-replayed"] == "true"
    job = httpx.get(accepted["status_url"], headers=stack.auth).json()
    assert set(job) >= {"job_id", "model", "model_version", "status", "submitted_at", "started_at", "finished_at"}


@pytest.mark.parametrize(
    ("model", "kwargs", "status", "code"),
    [
        ("chest-xray", {"json": {"inputs": fraud_example(rows=1)}}, 415, "unsupported_media_type"),
        ("fraud", {"files": {"file": ("a.png", b"\x89PNG\r\n\x1a\n")}}, 415, "unsupported_media_type"),
        ("fraud", {"json": {"inputs": [{**fraud_example(rows=1)[0], "shape": [1, 29]}]}}, 422, "invalid_tensor"),
        ("fraud", {"json": {"inputs": "nope"}}, 422, "invalid_request"),
        ("fraud", {"content": b"{", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
        ("fraud", {"json": {"inputs": fraud_example(rows=1), "priority": 99}}, 422, "invalid_request"),
        ("chest-xray", {"files": {"file": ("a.png", b"\x89PNG\r\n\x1a\ngarbage")}}, 422, "invalid_image"),
        ("chest-xray", {"content": b"raw", "headers": {"content-type": "text/plain"}}, 422, "invalid_request"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_code(
    stack: Stack, model: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    kwargs = {**kwargs, "headers": {**stack.auth, **kwargs.get("headers", {})}}
    response = httpx.post(f"{stack.api_url}/v1/models/{model}/jobs", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_models_health_and_docs(stack: Stack) -> None:
    with stack.client() as client:
        client.submit("fraud-idle", inputs=fraud_example(rows=1))
        models = {m["name"]: m for m in client.models()}
    assert set(models) == {"chest-xray", "fraud", "fraud-idle", "fraud-celery"}
    assert models["fraud-idle"]["queue_depth"] >= 1
    assert models["chest-xray"]["trained"] is False and models["chest-xray"]["labels"][0] == "Atelectasis"
    assert httpx.get(f"{stack.api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.api_url}/readyz").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"chest-xray", "fraud", "fraud-celery"}
    assert all(model["workers"] >= 1 for model in ready["models"].values())
    assert httpx.get(f"{stack.api_url}/docs").status_code == 200
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    content = spec["paths"]["/v1/models/{model}/jobs"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
