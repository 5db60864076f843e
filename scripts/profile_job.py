"""Where the milliseconds of one job go, end to end: a job at low load, through HTTP, Redis and a worker.

Starts a private Redis, `inferq api` and `inferq worker --pool cpu --models MODEL` (its defaults; `fraud` unless
`--model chest-xray`, whose jobs cycle through the demo's sample uploads), warms them up, then runs jobs one after
another as a user does (`submit`, then `result(job_id, wait_s=...)`), twice: timed, then under MONITOR (which slows
Redis down), and prints:

- a time line per job (p50 and p90 over the jobs) from the client's clocks and the job record's own timestamps
  (Redis `TIME`, taken inside the scripts that create, claim, begin and finish the job), next to in-process
  floors measured here: one HTTP round trip (`GET /healthz`), one Redis `PING`, the model's decode + forward
  pass on one row;
- the Redis commands one job costs, by who sent them (the API, the worker, or a Lua script inside Redis), counted
  with `MONITOR` (redis-py's `monitor()`) and net of what the same processes send while idle (heartbeats,
  broker polling). MONITOR sees commands, not round trips: a pipeline of five commands is one round trip here
  counted as five; a Lua script is one command from its client, and the calls it makes appear as `lua`.

    .venv/bin/python scripts/profile_job.py [--model fraud|chest-xray] [--jobs 200] [--idle-s 5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np
import redis
import torch
from procfs import PGRP, process_stats

from inferq.config import Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import redis_client
from inferq.protocol.intake import TensorUpload, validate_input
from inferq.protocol.keys import job_key
from inferq.protocol.registry import ImageInput, ModelSpec, load_registry
from inferq.workers.inference import load_runner
from inferq.workers.layout import usable_cpus
from inferq.workers.weights import ensure_generated_weights

_STARTUP_TIMEOUT_S = 300.0
_WAIT_S = 30.0
_MARKER = "inferq-profile-marker"


@dataclass
class Timeline:
    """One job's moments, in epoch seconds: the client's clock and Redis's (the same host, the same clock)."""

    sent: float
    created: float
    accepted: float
    claimed: float
    computing: float
    finished: float
    received: float


@dataclass
class Capture:
    """What MONITOR saw between two markers: (client port or 'lua', command name) counts, and the span."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    span_s: float = 0.0


class Monitor:
    """Counts the commands Redis runs, from a thread holding a MONITOR connection; windows are cut by markers."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self._marker_client = redis.Redis.from_url(url, decode_responses=True)
        self._captures: dict[str, Capture] = {}
        self._open: dict[str, float] = {}
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        """Start listening; returns once MONITOR is live. A marker sent before Redis has switched the connection to
        MONITOR is never seen, so markers are sent until one is."""
        self._thread.start()
        deadline = time.monotonic() + 10.0
        for attempt in range(1_000_000):
            text = f"started-{attempt}"
            self._marker_client.echo(f"{_MARKER}:{text}")
            key = f"seen:{text}"
            with self._seen:
                self._seen.wait_for(lambda: key in self._captures or self._error is not None, 0.2)  # noqa: B023
                if key in self._captures:
                    return
            if self._error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MONITOR did not start: {self._error!r}")

    def _listen(self) -> None:
        try:
            with self._redis.monitor() as monitor:
                for entry in monitor.listen():
                    self._record(entry)
        except BaseException as e:  # reported by the main thread
            self._error = e
            with self._seen:
                self._seen.notify_all()

    def _record(self, entry: dict[str, Any]) -> None:
        words = entry["command"].split(" ")
        name = words[0].upper()
        if name == "ECHO" and len(words) == 2 and words[1].startswith(_MARKER):
            with self._seen:
                self._on_marker(words[1][len(_MARKER) + 1 :], entry["time"])
                self._seen.notify_all()
            return
        for capture in (self._captures[label] for label in self._open):
            client = "lua" if entry["client_type"] == "lua" else entry["client_port"]
            capture.counts[(client, name)] += 1

    def _on_marker(self, text: str, at_s: float) -> None:
        action, _, label = text.partition(":")
        if action == "open":
            self._captures[label] = Capture()
            self._open[label] = at_s
        elif action == "close":
            self._captures[label].span_s = at_s - self._open.pop(label)
        self._captures.setdefault(f"seen:{text}", Capture())

    def mark(self, text: str) -> None:
        """Send a marker and wait until the monitor thread has seen it, so windows are cut exactly."""
        self._marker_client.echo(f"{_MARKER}:{text}")
        deadline = time.monotonic() + 10.0
        with self._seen:
            while f"seen:{text}" not in self._captures:
                if self._error is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"MONITOR did not see the marker {text!r}: {self._error!r}")
                self._seen.wait(timeout=0.5)

    def window(self, label: str, work: Callable[[], object]) -> Capture:
        self.mark(f"open:{label}")
        work()
        self.mark(f"close:{label}")
        return self._captures[label]

    def close(self) -> None:
        self._marker_client.close()
        self._redis.close()  # the listening thread is a daemon; its connection dies with the process


# --- who holds which connection: client port -> service, from /proc


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, fields in process_stats().items() if int(fields[PGRP]) == pgid]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in (Path("/proc") / str(pid) / "fd").iterdir():
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if match:
                inodes.add(int(match.group(1)))
    except OSError:
        pass
    return inodes


def _local_ports_by_inode() -> dict[int, int]:
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            ports[int(columns[9])] = int(columns[1].rsplit(":", 1)[1], 16)
    return ports


def port_owners(stack: ServiceStack) -> dict[str, str]:
    """Client port (as MONITOR shows it) -> the service whose process holds that connection."""
    by_inode = _local_ports_by_inode()
    owners = {}
    groups = {name: process.pid for name, process in stack.processes.items()}
    groups["profiler"] = os.getpgid(0)
    for name, pgid in groups.items():
        members = _group_members(pgid) if name != "profiler" else [os.getpid()]
        for pid in members:
            for inode in _socket_inodes(pid):
                if inode in by_inode:
                    owners[str(by_inode[inode])] = name
    owners["lua"] = "lua (inside scripts)"
    return owners


# --- the measurements


@dataclass(frozen=True)
class Job:
    """One job's input: OIP `inputs` (a tensor model) or an uploaded file (an image model)."""

    inputs: list[dict[str, Any]] | None = None
    file: tuple[str, bytes] | None = None

    def submit(self, client: InferqClient, model: str) -> str:
        if self.file is not None:
            name, data = self.file
            return client.submit(model, data, filename=name)
        return client.submit(model, inputs=self.inputs)

    def blob(self, spec: ModelSpec, settings: Settings) -> bytes:
        """What a worker reads for this job: the file itself, or the validated tensor upload."""
        if self.file is not None:
            return self.file[1]
        upload = TensorUpload(inputs=[TensorPayload.model_validate(t) for t in self.inputs or []])
        return validate_input(spec, upload, settings).blob


def job_inputs(spec: ModelSpec, count: int, samples_dir: Path) -> list[Job]:
    """`count` jobs: one-row fraud transactions, or uploads cycling through the demo's sample kinds."""
    if isinstance(spec.input, ImageInput):
        files = [(path.name, path.read_bytes()) for path in write_samples(samples_dir)]
        return [Job(file=files[i % len(files)]) for i in range(count)]
    [tensor] = fraud_example(rows=count)
    width = tensor["shape"][1]
    data = tensor["data"]
    return [
        Job(inputs=[{**tensor, "shape": [1, width], "data": data[i * width : (i + 1) * width]}]) for i in range(count)
    ]


def run_jobs(client: InferqClient, model: str, jobs: list[Job]) -> list[tuple[str, float, float, float]]:
    """Each job submitted and waited for in turn: (job id, sent, accepted, received), epoch seconds."""
    marks = []
    for job_input in jobs:
        sent = time.time()
        job_id = job_input.submit(client, model)
        accepted = time.time()
        job = client.result(job_id, wait_s=_WAIT_S)
        received = time.time()
        if job["status"] != "succeeded":
            raise RuntimeError(f"a profiled job ended {job['status']}: {job.get('error')}")
        marks.append((job_id, sent, accepted, received))
    return marks


def timelines(redis_url: str, marks: list[tuple[str, float, float, float]]) -> list[Timeline]:
    store = redis_client(redis_url, decode=True)
    try:
        pipe = store.pipeline(transaction=False)
        for job_id, *_ in marks:
            pipe.hmget(job_key(job_id), ["submitted_at", "started_at", "computing_at", "finished_at"])
        records = pipe.execute()
    finally:
        store.close()
    return [
        Timeline(sent, float(created), accepted, float(claimed), float(computing), float(finished), received)
        for (_, sent, accepted, received), (created, claimed, computing, finished) in zip(marks, records, strict=True)
    ]


def _floor_ms(work: Callable[[], object], runs: int) -> list[float]:
    work()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return times


def floors(api_url: str, redis_url: str, spec: ModelSpec, jobs: list[Job], runs: int) -> dict[str, list[float]]:
    """In-process references: the least any HTTP call, Redis command and the model's own work can cost here (the
    model on one thread, as a worker node runs it under load, and on every usable core, as a lone pass borrows
    them at low load)."""
    settings = Settings()
    runner = load_runner(spec, settings, torch.device("cpu"))
    blobs = [job.blob(spec, settings) for job in jobs[: min(len(jobs), 16)]]
    turn = itertools.count()
    image = isinstance(spec.input, ImageInput)

    def model_work() -> np.ndarray:
        rows = runner.prepare(blobs[next(turn) % len(blobs)])[0]
        return runner.infer(rows[np.newaxis] if image else rows)  # an image decodes to one row, a tensor to its rows

    model_runs = min(runs, 30) if image else runs
    store = redis_client(redis_url, decode=True)
    try:
        with httpx.Client(base_url=api_url) as http:
            measured = {
                "HTTP round trip (GET /healthz, keep-alive)": _floor_ms(lambda: http.get("/healthz"), runs),
                "Redis round trip (PING)": _floor_ms(store.ping, runs),
            }
        for threads in sorted({1, usable_cpus()}):
            torch.set_num_threads(threads)
            name = f"model in-process: decode + forward, 1 input, {threads} thread(s)"
            measured[name] = _floor_ms(model_work, model_runs)
        return measured
    finally:
        store.close()


# --- the report


def _p(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1] if len(values) > 1 else values[0]


def print_timeline(model: str, lines: list[Timeline], floor_ms: dict[str, list[float]]) -> None:
    steps: list[tuple[str, Callable[[Timeline], float]]] = [
        ("POST sent -> record created (HTTP, parse, auth, validate, create script)", lambda t: t.created - t.sent),
        ("record created -> 202 at the client (Celery publish, response)", lambda t: t.accepted - t.created),
        ("record created -> claimed (publish, broker delivery, claim + blob read)", lambda t: t.claimed - t.created),
        ("claimed -> computing (decode, batcher, begin script)", lambda t: t.computing - t.claimed),
        (
            "computing -> finished (forward pass, finish script: result + done publish)",
            lambda t: t.finished - t.computing,
        ),
        ("finished -> client has the job (wake-up, status read, response)", lambda t: t.received - t.finished),
        ("end to end at the client", lambda t: t.received - t.sent),
    ]
    print(f"\ntime line of one {model} job, {len(lines)} jobs one after another (ms; steps 2 and 3 overlap)")
    print(f"  {'step':78} {'p50':>7} {'p90':>7}")
    for name, of in steps:
        values = [of(line) * 1000 for line in lines]
        print(f"  {name:78} {_p(values, 50):7.2f} {_p(values, 90):7.2f}")
    print("in-process floors, measured here")
    for name, values in floor_ms.items():
        print(f"  {name:78} {_p(values, 50):7.2f} {_p(values, 90):7.2f}")


def print_commands(idle: Capture, busy: Capture, owners: dict[str, str], jobs: int) -> None:
    def by_service(capture: Capture) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        for (port, command), count in capture.counts.items():
            counts[(owners.get(port, "other"), command)] += count
        return counts

    idle_counts, busy_counts = by_service(idle), by_service(busy)
    scale = busy.span_s / idle.span_s if idle.span_s > 0 else 0.0
    net = {key: busy_counts[key] - idle_counts.get(key, 0) * scale for key in busy_counts}
    print(f"\nRedis commands per job (MONITOR over {jobs} jobs in {busy.span_s:.1f} s, minus the idle rate of a")
    print(f"{idle.span_s:.1f} s window scaled to it; the profiler's own commands left out)")
    print(f"  {'sent by':22} {'command':20} {'per job':>8} {'idle per s':>11}")
    totals: dict[str, float] = {}
    for (service, command), count in sorted(net.items(), key=lambda item: (item[0][0], -item[1])):
        if service == "profiler":
            continue
        per_job = count / jobs
        totals[service] = totals.get(service, 0.0) + per_job
        idle_rate = idle_counts.get((service, command), 0) / idle.span_s if idle.span_s > 0 else 0.0
        if abs(per_job) >= 0.05 or idle_rate > 0:
            print(f"  {service:22} {command:20} {per_job:8.2f} {idle_rate:11.2f}")
    for service, total in sorted(totals.items()):
        print(f"  {service:22} {'(all)':20} {total:8.2f}")


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the `finally` blocks that stop what this run started


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fraud", help="the model whose jobs are profiled (fraud, chest-xray)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs timed one after another")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle window for the background command rate")
    args = parser.parse_args()
    began = time.monotonic()
    settings = Settings()
    model = args.model
    spec = load_registry(settings.registry_path).get_model(model)
    ensure_generated_weights(spec, settings)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"inferq job profile, {now}: {usable_cpus()} usable CPU(s), model {model}, {args.jobs} jobs")
    with tempfile.TemporaryDirectory() as tmp_dir, EmbeddedRedis(Path(tmp_dir) / "redis") as redis_server:
        url = redis_server.url
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        env = {**os.environ, "INFERQ_REDIS_URL": url, "INFERQ_API_PORT": str(api_port), "INFERQ_SERVED_MODELS": model}
        keys = redis_client(url, decode=True)
        try:
            api_key = ApiKeyStore(keys).create("profile", frozenset({"submit", "read"})).key
        finally:
            keys.close()
        stack = ServiceStack(env, Path(tmp_dir) / "logs")
        monitor = Monitor(url)
        try:
            stack.start("worker", "worker", "--pool", "cpu", "--models", model)
            stack.start("api", "api")
            stack.wait_http(f"{api_url}/readyz", timeout_s=_STARTUP_TIMEOUT_S)
            jobs = job_inputs(spec, args.jobs, Path(tmp_dir) / "samples")
            with InferqClient(api_url, api_key=api_key) as client:
                run_jobs(client, model, jobs[: min(50, len(jobs))])  # warm: connections, lazy imports, batchers
                # Timed without MONITOR (which slows Redis down), then counted with it.
                marks = run_jobs(client, model, jobs)
                monitor.start()
                idle = monitor.window(f"idle-{uuid.uuid4().hex}", lambda: time.sleep(args.idle_s))
                busy = monitor.window(f"busy-{uuid.uuid4().hex}", lambda: run_jobs(client, model, jobs))
            owners = port_owners(stack)
            floor_ms = floors(api_url, url, spec, jobs, runs=args.jobs)
            print_timeline(model, timelines(url, marks), floor_ms)
            print_commands(idle, busy, owners, len(jobs))
        except BaseException:
            stack.print_log_tails()
            raise
        finally:
            monitor.close()
            stack.stop()
    print(f"profile took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
