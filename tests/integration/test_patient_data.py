"""Patient data is kept only as long as needed and reaches no log, and a pickle message never runs."""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from kombu import Connection, Exchange

from inferq.producers.demo import fraud_example
from inferq.protocol.keys import blob_key, job_key, task_name_for
from tests.conftest import dump_redis
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow
_JOB_TIMEOUT_S = 300.0
IDENTIFIERS = {
    "PatientName": "QUIXOTE^ALONSO",
    "PatientID": "PID-58213977",
    "PatientBirthDate": "19470315",
    "AccessionNumber": "ACC-4412-0098",
}


def _identifiable(dicom: Path, n: int) -> bytes:
    from pydicom import dcmread

    dataset = dcmread(dicom)
    for keyword, value in IDENTIFIERS.items():
        setattr(dataset, keyword, value)
    dataset.StudyDescription = f"series {n}"
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _submit(stack: Stack, data: bytes, n: int) -> str:
    url = f"{stack.api_url}/v1/models/chest-xray/jobs"
    # The accession number as idempotency key, as a hospital would send it: it must be hashed where it is kept.
    headers = {**stack.auth, "Idempotency-Key": f"{IDENTIFIERS['AccessionNumber']}-{n}"}
    if n % 2:
        response = httpx.post(url, content=data, headers={**headers, "content-type": "application/dicom"}, timeout=60)
    else:
        response = httpx.post(url, files={"file": ("scan.dcm", data)}, headers=headers, timeout=60)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def test_identifiable_dicoms_leave_no_trace_in_logs_or_redis(stack: Stack) -> None:
    # Given identifiable DICOMs of every sample encoding, sent concurrently, as files and as bare bodies
    dicoms = [p for p in stack.samples if p.suffix == ".dcm"]
    uploads = [_identifiable(dicoms[n % len(dicoms)], n) for n in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        job_ids = list(pool.map(lambda nd: _submit(stack, nd[1], nd[0]), enumerate(uploads)))
    # When every job has ended
    with stack.client() as client:
        jobs = [client.result(job_id, wait_s=_JOB_TIMEOUT_S) for job_id in job_ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    # Then no identifier is in any service's log (access log included), nor in any Redis key or value
    logs = "\n".join(stack.services.log_of(name) for name in stack.services.processes)
    assert '"action":"submit_job"' in logs  # the access log is there, and was searched
    redis_dump = dump_redis(stack.redis_url)
    for value in IDENTIFIERS.values():
        assert value not in logs
        assert value.encode() not in redis_dump
    # The uploads themselves are gone: a blob lives only while its job does.
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    blob_refs = [client.hget(job_key(job_id), "blob_ref") for job_id in job_ids]
    assert all(blob_refs) and not any(client.exists(blob_key(ref)) for ref in blob_refs)  # type: ignore[arg-type]


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("queue", ["chest-xray", "fraud", "fraud-celery"])
def test_a_pickle_message_on_a_queue_never_runs(stack: Stack, queue: str) -> None:
    marker = stack.tmp / f"unpickled-{queue}"
    task_id = uuid.uuid4().hex
    headers = {"lang": "py", "task": task_name_for(queue), "id": task_id, "root_id": task_id, "argsrepr": "()"}
    with Connection(stack.redis_url) as connection:
        producer = connection.Producer(serializer="pickle")
        producer.publish(
            ((_Planted(marker),), {}, {}),
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers=headers,
            declare=[],
        )
    # The worker refuses the message; a job submitted after it on the same queue still runs.
    with stack.client() as client:
        if queue == "chest-xray":
            job_id = client.submit(queue, stack.samples[0])
        else:
            job_id = client.submit(queue, inputs=fraud_example(rows=1))
        assert client.result(job_id, wait_s=_JOB_TIMEOUT_S)["status"] == "succeeded"
    deadline = time.monotonic() + 30
    logs = ""
    while "untrusted content of type pickle" not in logs and time.monotonic() < deadline:
        logs = "\n".join(stack.services.log_of(name) for name in stack.services.processes)
        time.sleep(0.2)
    assert "untrusted content of type pickle" in logs
    assert not marker.exists()
    assert not stack.services.dead()
