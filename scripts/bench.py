"""Throughput of inferq against its reference, side by side in one run on the same cores.

Reference: the model called in-process (`ModelRunner.run` on each input, one after another).
System: the same inputs submitted over HTTP to a private Redis, one worker process, polled until done.
Prints both rates and their ratio; absolute times on a noisy machine mean little, the ratio more.

    .venv/bin/python scripts/bench.py --model chest-xray --jobs 40
    .venv/bin/python scripts/bench.py --model fraud --jobs 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from config import Settings
from producers.api_keys import ApiKeyStore
from producers.client import InferqClient
from producers.demo import fraud_example
from producers.redis_server import EmbeddedRedis, free_port
from producers.samples import write_samples
from producers.stack import ServiceStack
from protocol.codec import TensorPayload
from protocol.connections import redis_client
from protocol.intake import FileUpload, TensorUpload, validate_input
from protocol.registry import load_registry
from workers.inference import load_runner
from workers.weights import ensure_generated_weights


def _inputs(model: str, count: int, tmp: Path) -> list[FileUpload | TensorUpload]:
    if model == "fraud":
        return [TensorUpload(inputs=[TensorPayload.model_validate(t) for t in fraud_example(rows=8)])] * count
    samples = write_samples(tmp / "samples")
    return [FileUpload(data=samples[i % len(samples)].read_bytes()) for i in range(count)]


def reference_rate(model: str, uploads: list[FileUpload | TensorUpload]) -> float:
    settings = Settings()
    spec = load_registry(settings.registry_path).get_model(model)
    ensure_generated_weights(spec, settings)
    torch.set_num_threads(os.cpu_count() or 1)
    runner = load_runner(spec, settings, torch.device("cpu"))
    runner.warm_up()
    blobs = [validate_input(spec, u, settings).blob for u in uploads]
    started = time.perf_counter()
    for blob in blobs:
        runner.run(blob)
    return len(blobs) / (time.perf_counter() - started)


def _submit(client: InferqClient, model: str, upload: FileUpload | TensorUpload) -> str:
    if isinstance(upload, FileUpload):
        return client.submit(model, upload.data, filename="x")
    return client.submit(model, inputs=[t.model_dump() for t in upload.inputs])


def system_rate(model: str, uploads: list[FileUpload | TensorUpload], tmp: Path) -> tuple[float, float]:
    """Jobs per second from first submit to last finish, and the median queue-to-finish latency."""
    api_port = free_port()
    with EmbeddedRedis(tmp / "redis") as redis_server:
        env = {**os.environ, "INFERQ_REDIS_URL": redis_server.url, "INFERQ_API_PORT": str(api_port)}
        keys = ApiKeyStore(redis_client(redis_server.url, decode=True))
        api_key = keys.create("bench", frozenset({"submit", "read"})).key
        api_url = f"http://127.0.0.1:{api_port}"
        with ServiceStack(env, tmp / "logs") as stack, InferqClient(api_url, api_key=api_key) as client:
            stack.start("worker", "worker", "--pool", "cpu", "--models", model, "--concurrency", "1")
            stack.start("api", "api")
            stack.wait_http(f"http://127.0.0.1:{api_port}/readyz", timeout_s=120)
            client.result(_submit(client, model, uploads[0]), wait_s=300)  # the worker is warm from here
            started = time.perf_counter()
            job_ids = [_submit(client, model, u) for u in uploads]
            jobs = [client.result(job_id, wait_s=600) for job_id in job_ids]
            elapsed_s = time.perf_counter() - started
    assert all(job["status"] == "succeeded" for job in jobs), "a benchmark job failed"
    latencies_s = [_seconds(job["finished_at"]) - _seconds(job["submitted_at"]) for job in jobs]
    return len(jobs) / elapsed_s, statistics.median(latencies_s)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="chest-xray", choices=["chest-xray", "fraud"])
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        uploads = _inputs(args.model, args.jobs, tmp)
        reference = reference_rate(args.model, uploads)
        system, median_latency_s = system_rate(args.model, uploads, tmp)
    print(f"model {args.model}, {args.jobs} jobs, {os.cpu_count()} cores")
    print(f"reference (in-process): {reference:8.1f} jobs/s")
    print(f"inferq (HTTP+Celery):   {system:8.1f} jobs/s   median submit-to-finish {median_latency_s * 1000:.0f} ms")
    print(f"ratio inferq/reference: {system / reference:8.2f}")


if __name__ == "__main__":
    main()
