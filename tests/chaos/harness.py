"""Chaos scenarios against real processes: a private Redis (AOF on), the reconciler, the callback worker and worker
processes, hurt on purpose with real signals. Shared by the `chaos` tests (each scenario once) and
`scripts/chaos.py` (each scenario five times, a table of figures).

Every scenario submits jobs through `JobSubmitter`, the one submission function every intake calls, and counts:
submitted, succeeded, failed (with their codes), lost (not final in time), and run twice (a job whose outcome was
recorded more than once, read from the workers' logs, or whose callback was delivered under two different ids).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.producers.submit import JobSubmitter, SubmitOptions
from inferq.protocol.celery_config import build_celery
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.intake import FileUpload, TensorUpload, validate_input
from inferq.protocol.jobs import FINAL_STATUSES, new_job_id
from inferq.protocol.registry import load_registry
from tests.callback_receiver import CALLBACK_SECRET, CallbackReceiver

_RECORDED = re.compile(r"job ([0-9a-f]{32}) recorded (\w+)")
# A bulk chunk's jobs share one line: "chunk of N jobs recorded (batches of [..]): succeeded: id id; failed: id".
_CHUNK_RECORDED = re.compile(r"chunk of \d+ jobs recorded \(batches of [^)]*\): ([^\n\"]*)")
# A model whose time limits a batch of chest X-rays on one CPU thread always overruns.
_SLOW_MODEL = """
[models.slow-xray]
version = "0.1.0"
pool = "cpu"
format = "safetensors"
weights = "chest-xray-0.1.0.safetensors"
sha256 = "{sha}"
trained = false
weights_seed = 14
labels = {labels}
time_limit_s = 0.05
hard_time_limit_s = 0.5
max_batch_size = 8
batch_wait_ms = 50
architecture = {{ name = "densenet121" }}
input = {{ kind = "image", height = 224, width = 224, channels = 1, mean = [0.449], std = [0.226] }}
"""


@dataclass
class Tally:
    scenario: str
    submitted: int = 0
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    run_twice: int = 0
    retried: int = 0
    seconds: float = 0.0
    stuck: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # the failed jobs' records, for assertion messages

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed": dict(self.failed),
            "lost": self.lost,
            "run_twice": self.run_twice,
            "attempts>1": self.retried,
            "seconds": round(self.seconds, 1),
            **(
                {"stuck": [{k: v for k, v in s.items() if k not in ("result",)} for s in self.stuck]}
                if self.stuck
                else {}
            ),
        }


class ChaosStack:
    """Redis, the reconciler and the callback worker; workers are started per scenario."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = EmbeddedRedis(tmp / "redis", port=free_port())
        self.registry_path = tmp / "models.toml"
        chest = load_registry(DEFAULT_REGISTRY_PATH).get_model("chest-xray")
        labels = json.dumps(list(chest.labels))
        self.registry_path.write_text(
            DEFAULT_REGISTRY_PATH.read_text() + _SLOW_MODEL.format(sha=chest.sha256, labels=labels)
        )
        self.env = {
            **os.environ,
            "INFERQ_REDIS_URL": self.redis.url,
            "INFERQ_REGISTRY_PATH": str(self.registry_path),
            "INFERQ_MODELS_DIR": str(Settings().models_dir),
            "INFERQ_TORCH_THREADS": "1",
            "INFERQ_LEASE_S": "3",
            "INFERQ_RECONCILE_INTERVAL_S": "0.5",
            "INFERQ_LOST_MESSAGE_CHECK_S": "2",
            "INFERQ_RETRY_BACKOFF_S": "0.2",
            "INFERQ_CALLBACK_SECRET": CALLBACK_SECRET,
            "INFERQ_CALLBACK_ALLOW": "127.0.0.1",
            "INFERQ_CALLBACK_BACKOFF_S": "0.5",
        }
        self.services = ServiceStack(self.env, tmp / "logs")
        self.samples = write_samples(tmp / "samples")
        self._workers = 0

    def __enter__(self) -> ChaosStack:
        self.redis.start()
        self.settings = Settings(
            redis_url=self.redis.url,
            registry_path=self.registry_path,
            lease_s=3,
            reconcile_interval_s=0.5,
            lost_message_check_s=2,
        )
        self.registry = load_registry(self.registry_path)
        self.celery = build_celery(self.settings, self.registry)
        self.stores = self._open_stores()
        self.submitter = JobSubmitter(
            settings=self.settings, registry=self.registry, stores=self.stores, celery_app=self.celery
        )
        self.services.start("callbacks", "callbacks", "--threads", "4")
        self.services.start("reconciler", "reconciler")
        return self

    def __exit__(self, *_: object) -> None:
        self.services.stop()
        self.celery.close()
        self.redis.stop()

    def _open_stores(self) -> Stores:
        return open_stores(self.redis.url, queued_ttl_s=3600, result_ttl_s=3600)

    # --- workers

    def start_worker(self, *args: str) -> str:
        self._workers += 1
        name = f"worker{self._workers}"
        self.services.start(name, "worker", "--pool", "cpu", "--models", "chest-xray,fraud,slow-xray", *args)
        self.wait_consumers(minimum=1)
        return name

    def wait_consumers(self, *, minimum: int, timeout_s: float = 120) -> None:
        """Until `minimum` worker processes heartbeat on the chest-xray queue (their models are loaded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now_s = self.stores.jobs.server_time_s()
            with contextlib.suppress(Exception):
                if self.stores.text.zcount("inferq:consumers:chest-xray", now_s - 5, "+inf") >= minimum:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {minimum} worker processes came up; logs in {self.services.log_dir}")

    def signal_worker(self, name: str, sig: signal.Signals) -> None:
        """`sig` to a whole worker: its supervisor and every worker process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.services.processes[name].pid, sig)

    def worker_pids(self, name: str) -> list[int]:
        """The worker processes (Celery nodes) under a worker's supervisor."""
        supervisor = self.services.processes[name].pid
        done = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False)
        return [int(pid) for pid in done.stdout.split()]

    def stop_worker(self, name: str) -> None:
        self.signal_worker(name, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.services.processes[name].wait(timeout=120)
        self.signal_worker(name, signal.SIGKILL)
        self.services.processes.pop(name, None)

    # --- jobs

    def submit_xrays(self, count: int, *, model: str = "chest-xray", **options: Any) -> list[str]:
        data = [p.read_bytes() for p in self.samples]
        return [
            self.submitter.submit(model, FileUpload(data[i % len(data)]), SubmitOptions(**options)).job_id
            for i in range(count)
        ]

    def submit_fraud(self, count: int, **options: Any) -> list[str]:
        upload = TensorUpload(inputs=[TensorPayload.model_validate(t) for t in fraud_example(rows=2)])
        return [self.submitter.submit("fraud", upload, SubmitOptions(**options)).job_id for _ in range(count)]

    def record_unpublished(self, count: int) -> list[str]:
        """Jobs stored as the API stores them, whose publish never happened (the API died in between)."""
        job_ids = []
        for _ in range(count):
            job_id = new_job_id()
            upload = TensorUpload(inputs=[TensorPayload.model_validate(t) for t in fraud_example(rows=1)])
            blob = validate_input(self.registry.get_model("fraud"), upload, self.settings).blob
            blob_ref = self.stores.blobs.put(blob, ttl_s=3600)
            fields = {"model": "fraud", "model_version": "0.1.0", "blob_ref": blob_ref, "max_attempts": "3"}
            fields |= {"input_kind": "tensor", "media_type": "application/json"}
            self.stores.jobs.create(job_id, fields)
            job_ids.append(job_id)
        return job_ids

    def wait_final(self, job_ids: list[str], *, timeout_s: float) -> list[dict[str, Any] | None]:
        deadline = time.monotonic() + timeout_s
        views: list[dict[str, Any] | None] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                views = self.stores.jobs.views(job_ids)
                if all(v is not None and v["status"] in FINAL_STATUSES for v in views):
                    return views
            time.sleep(0.25)
        return views

    def tally(self, scenario: str, job_ids: list[str], *, timeout_s: float, started_s: float) -> Tally:
        views = self.wait_final(job_ids, timeout_s=timeout_s)
        tally = Tally(scenario, submitted=len(job_ids), seconds=time.monotonic() - started_s)
        recorded = Counter(
            job_id for name in self.services.processes for job_id in _recorded_ids(self.services.log_of(name))
        )
        for job_id, view in zip(job_ids, views or [None] * len(job_ids), strict=True):
            if view is None or view["status"] not in FINAL_STATUSES:
                tally.lost += 1
                with contextlib.suppress(Exception):
                    tally.stuck.append({"job_id": job_id, **self.stores.jobs.fields(job_id)})
                continue
            if view["status"] == "succeeded":
                tally.succeeded += 1
            else:
                tally.failed[(view.get("error") or {}).get("code", view["status"])] += 1
                with contextlib.suppress(Exception):  # what a failure report needs to tell why
                    tally.failures.append({"job_id": job_id, **self.stores.jobs.fields(job_id)})
            tally.run_twice += recorded[job_id] > 1
            tally.retried += view["attempts"] > 1
        return tally


def _recorded_ids(log: str) -> list[str]:
    """Each job id a worker's log says it recorded an outcome for, once per recording."""
    ids = [m.group(1) for m in _RECORDED.finditer(log)]
    for m in _CHUNK_RECORDED.finditer(log):
        ids += re.findall(r"\b[0-9a-f]{32}\b", m.group(1))
    return ids


@contextlib.contextmanager
def chaos_stack(tmp: Path) -> Iterator[ChaosStack]:
    with ChaosStack(tmp) as stack:
        yield stack


def _after(delay_s: float, action: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- the scenarios: each starts its own worker(s) and leaves none running


def kill_whole_worker(stack: ChaosStack) -> Tally:
    """SIGKILL a whole worker (supervisor and processes) mid-run; a second worker takes over its jobs."""
    first = stack.start_worker()
    started = time.monotonic()
    job_ids = stack.submit_xrays(40)
    time.sleep(1.5)
    stack.signal_worker(first, signal.SIGKILL)
    second = stack.start_worker()
    tally = stack.tally("SIGKILL whole worker", job_ids, timeout_s=120, started_s=started)
    stack.stop_worker(second)
    stack.services.processes.pop(first, None)
    return tally


def kill_one_process(stack: ChaosStack) -> Tally:
    """SIGKILL one worker process mid-run; its supervisor starts it again."""
    name = stack.start_worker()
    started = time.monotonic()
    job_ids = stack.submit_xrays(40)
    time.sleep(1.5)
    os.kill(stack.worker_pids(name)[0], signal.SIGKILL)
    tally = stack.tally("SIGKILL one worker process", job_ids, timeout_s=120, started_s=started)
    stack.stop_worker(name)
    return tally


def restart_redis(stack: ChaosStack) -> Tally:
    """Shut Redis down mid-run (AOF on) and start it again two seconds later."""
    name = stack.start_worker()
    started = time.monotonic()
    job_ids = stack.submit_xrays(40)
    time.sleep(1.0)
    stack.redis.stop()
    time.sleep(2.0)
    stack.redis.start()
    tally = stack.tally("restart Redis", job_ids, timeout_s=180, started_s=started)
    stack.stop_worker(name)
    return tally


def terminate_worker(stack: ChaosStack) -> Tally:
    """SIGTERM mid-run: the worker finishes or hands back what it holds and exits; a new one does the rest."""
    first = stack.start_worker()
    started = time.monotonic()
    job_ids = stack.submit_xrays(30)
    time.sleep(1.5)
    stack.signal_worker(first, signal.SIGTERM)
    stack.services.processes[first].wait(timeout=120)
    second = stack.start_worker()
    tally = stack.tally("SIGTERM mid-run", job_ids, timeout_s=120, started_s=started)
    stack.stop_worker(second)
    return tally


def hard_time_limit(stack: ChaosStack) -> Tally:
    """A model whose batches overrun their limits: those jobs end `timeout`; the worker keeps serving others."""
    name = stack.start_worker("--processes", "1")
    started = time.monotonic()
    slow = stack.submit_xrays(8, model="slow-xray")
    time.sleep(3.0)
    normal = stack.submit_fraud(10)
    tally = stack.tally("past the hard time limit", slow + normal, timeout_s=120, started_s=started)
    stack.stop_worker(name)
    return tally


def poison_input(stack: ChaosStack) -> Tally:
    """A job whose forward pass kills whichever worker process runs it: dead-lettered after max_attempts; the jobs
    that waited or were batched beside it in the dying processes are spared and succeed."""
    name = stack.start_worker()
    started = time.monotonic()
    [poison] = stack.submit_xrays(1)
    stop = threading.Event()

    def kill_its_worker() -> None:
        killed: set[str] = set()
        while not stop.is_set():
            with contextlib.suppress(Exception):
                fields = stack.stores.jobs.fields(poison)
                attempt = f"{fields.get('attempts')}:{fields.get('worker_pid')}"
                if fields.get("status") == "running" and fields.get("computing_at") and attempt not in killed:
                    killed.add(attempt)
                    os.kill(int(fields["worker_pid"]), signal.SIGKILL)
            time.sleep(0.02)

    threading.Thread(target=kill_its_worker, daemon=True).start()
    others = stack.submit_xrays(12) + stack.submit_fraud(12)
    tally = stack.tally("input that kills its worker", [poison, *others], timeout_s=180, started_s=started)
    stop.set()
    stack.stop_worker(name)
    return tally


def callback_receiver_down(stack: ChaosStack) -> Tally:
    """The callback receiver answers 503 for 3 s; every callback still arrives, signed, once it recovers."""
    name = stack.start_worker()
    receiver = CallbackReceiver(healthy_after_s=3.0)
    started = time.monotonic()
    job_ids = stack.submit_fraud(10, callback_url=receiver.url)
    tally = stack.tally("callback receiver down", job_ids, timeout_s=60, started_s=started)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len({d["id"] for d in receiver.deliveries}) < len(job_ids):
        time.sleep(0.2)
    delivered = Counter(d["payload"]["data"]["job_id"] for d in receiver.deliveries)
    tally.lost += sum(1 for job_id in job_ids if delivered[job_id] == 0)  # a callback never delivered is lost too
    tally.run_twice += sum(1 for d in {d["id"] for d in receiver.deliveries} if d not in {f"msg_{j}" for j in job_ids})
    receiver.close()
    stack.stop_worker(name)
    assert receiver.refused > 0 and receiver.bad_signatures == 0, (receiver.refused, receiver.bad_signatures)
    return tally


def lost_message(stack: ChaosStack) -> Tally:
    """Jobs recorded whose message was never published: the reconciler publishes them and they run."""
    name = stack.start_worker()
    started = time.monotonic()
    job_ids = stack.record_unpublished(5)
    tally = stack.tally("message lost", job_ids, timeout_s=60, started_s=started)
    stack.stop_worker(name)
    return tally


SCENARIOS: dict[str, Callable[[ChaosStack], Tally]] = {
    "kill_whole_worker": kill_whole_worker,
    "kill_one_process": kill_one_process,
    "restart_redis": restart_redis,
    "terminate_worker": terminate_worker,
    "hard_time_limit": hard_time_limit,
    "poison_input": poison_input,
    "callback_receiver_down": callback_receiver_down,
    "lost_message": lost_message,
}


def main_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(row) for row in rows)


if __name__ == "__main__":
    sys.exit("run scripts/chaos.py")
