"""Decoding as its own stage: CPU workers decode on `<model>.prep`, the model's workers (a GPU pool in production)
take the tensor; the result equals the one-stage path. Real Redis, real worker subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.redis_server import EmbeddedRedis
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.producers.submit import JobSubmitter, SubmitOptions
from inferq.protocol.celery_config import build_celery
from inferq.protocol.connections import open_stores
from inferq.protocol.intake import FileUpload
from inferq.protocol.jobs import FINAL_STATUSES, JobStore
from inferq.protocol.priority import Priority
from inferq.protocol.registry import load_registry
from tests.integration.test_end_to_end import _assert_same_result

pytestmark = pytest.mark.slow
_SPLIT_MODEL = """
[models.xray-split]
version = "0.1.0"
pool = "gpu"
format = "safetensors"
weights = "chest-xray-0.1.0.safetensors"
sha256 = "{sha}"
trained = false
weights_seed = 14
labels = {labels}
preprocess = "separate"
max_batch_size = 8
batch_wait_ms = 20
architecture = {{ name = "densenet121" }}
input = {{ kind = "image", height = 224, width = 224, channels = 1, mean = [0.449], std = [0.226] }}
"""


@dataclass
class Stages:
    env: dict[str, str]
    submitter: JobSubmitter
    jobs: JobStore
    samples: list[Path]


@pytest.fixture(scope="module")
def stages(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stages]:
    tmp = tmp_path_factory.mktemp("stages")
    chest = load_registry(DEFAULT_REGISTRY_PATH).get_model("chest-xray")
    registry_path = tmp / "models.toml"
    registry_path.write_text(_SPLIT_MODEL.format(sha=chest.sha256, labels=json.dumps(list(chest.labels))))
    url = redis_server.url_for(9)
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": url,
        "INFERQ_REGISTRY_PATH": str(registry_path),
        "INFERQ_TORCH_THREADS": "1",
    }
    settings = Settings(redis_url=url, registry_path=registry_path)
    registry = load_registry(registry_path)
    stores = open_stores(url, queued_ttl_s=3600, result_ttl_s=3600)
    stores.text.flushdb()
    celery = build_celery(settings, registry)
    with ServiceStack(env, tmp / "logs") as services:
        # The decoding stage on a CPU worker, the model's stage on another (the cpu pool stands in for a GPU here)
        common = ["worker", "--pool", "cpu", "--models", "xray-split", "--processes", "1"]
        services.start("prep", *common, "--stage", "prep")
        services.start("model", *common, "--stage", "model")
        submitter = JobSubmitter(settings=settings, registry=registry, stores=stores, celery_app=celery)
        yield Stages(env, submitter, stores.jobs, write_samples(tmp / "samples"))
    celery.close()


def _wait(jobs: JobStore, job_ids: list[str], timeout_s: float = 300) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = jobs.views(job_ids)
        if all(v is not None and v["status"] in FINAL_STATUSES for v in views):
            return [v for v in views if v is not None]
        time.sleep(0.2)
    raise TimeoutError(f"jobs not final: {jobs.views(job_ids)}")


def test_two_stages_give_the_same_results_as_one(stages: Stages) -> None:
    job_ids = [
        stages.submitter.submit("xray-split", FileUpload(p.read_bytes()), SubmitOptions()).job_id
        for p in stages.samples
    ]
    served = _wait(stages.jobs, job_ids)
    argv = [sys.executable, "-m", "inferq.producers.cli", "predict", "--model", "xray-split", *map(str, stages.samples)]
    done = subprocess.run(argv, env=stages.env, capture_output=True, text=True, timeout=300, check=True)
    local = [json.loads(line) for line in done.stdout.splitlines()]
    for job, result in zip(served, local, strict=True):
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1  # decoding in its own stage is not an extra attempt
        _assert_same_result(job["result"], result)


def test_a_bad_image_fails_in_the_decoding_stage_and_never_reaches_the_model(stages: Stages) -> None:
    png = next(p for p in stages.samples if p.name == "chest-8bit.png").read_bytes()
    job_id = stages.submitter.submit("xray-split", FileUpload(png[: len(png) // 2]), SubmitOptions()).job_id
    [job] = _wait(stages.jobs, [job_id])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_image"
    assert stages.jobs.fields(job_id).get("tensor_ref") is None


def test_both_stages_serve_every_tenant_sub_queue_at_every_priority(stages: Stages) -> None:
    # "north" and "south" hash to buckets 1 and 3 of the default 4: the decoding stage takes them from
    # `xray-split.prep.t1/.t3` and hands them on to `xray-split.t1/.t3`, which the model's workers consume too.
    png = next(p for p in stages.samples if p.name == "chest-8bit.png").read_bytes()
    classes = (Priority.STAT, Priority.ROUTINE)
    options = [SubmitOptions(tenant=t, priority=p) for t in ("north", "south") for p in classes]
    job_ids = [stages.submitter.submit("xray-split", FileUpload(png), o).job_id for o in options]
    for job in _wait(stages.jobs, job_ids):
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
