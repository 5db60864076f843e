"""inferq against the limit of this machine and against the Celery app a user writes first: one run, same cores.

1. The limit: the same preprocessing (`ModelRunner.prepare` on the same input bytes) and model in-process, in its
   best configuration on the usable cores: processes x torch threads x batch size searched, each candidate in
   fresh subprocesses over a fixed number of inputs; every candidate and the best are printed. The best is run
   again (twice the inputs) just before inferq and just after it, and the ratios divide by the mean of those two:
   the highest of several noisy figures reads high by chance, and this machine's speed drifts within minutes.
2. The naive baseline: `scripts/naive_celery_app.py` (Redis broker and result backend, JSON, the image base64 in
   the message, Celery defaults), started as `celery -A naive_celery_app worker`; client threads `.delay().get()`.
3. inferq: `inferq api` and `inferq worker --pool cpu --models ...` with its defaults; each client thread has its
   own `InferqClient` and, in a closed loop, runs one job after another the way the README tells users to: an
   X-ray is submitted, then waited for with `result(job_id, wait_s=...)` (long-polling); a fraud check is one
   synchronous `submit_and_wait` (`Prefer: wait`); fraud also in bulk (`submit_many`, then `results`; the median of
   three runs).

All three share one private Redis and run one after the other. chest-xray: throughput at saturation (16 clients)
and latency at low load (1 client, sequential), whose overhead is end-to-end minus the in-process single-image
p50 in its best configuration (one process, the thread count with the lowest p50 in the search: on an idle host,
every core), measured in the same minutes: before each low-load job, a reference process runs the same image
in-process, since a shared machine's speed drifts by tens of percent between the search and the low-load phase.
fraud: one-row jobs per second. Each row prints system/limit and system/naive; on a busy machine the ratios mean more
than the absolute figures. Then the CPU per job that each part of each system spent in the saturation, fraud and bulk
loops (worker processes, API, Redis, clients), then the usable cores' time that went elsewhere (other processes,
idle, stolen by the hypervisor), beside what the cores offered per job.

    .venv/bin/python scripts/bench.py                 # everything (a few minutes on 2 cores)
    .venv/bin/python scripts/bench.py --only fraud    # one model
    .venv/bin/python scripts/bench.py --quick         # small counts: a smoke run
    .venv/bin/python scripts/bench.py --pool gpu      # chest-xray on the CUDA device, in every system
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # the naive Celery app

import numpy as np
import torch
from procfs import cpu_s_by_part, host_cpu_s

from inferq.config import Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.samples import SAMPLE_NAMES, write_samples
from inferq.producers.stack import ServiceStack
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import redis_client
from inferq.protocol.intake import TensorUpload, validate_input
from inferq.protocol.registry import ImageInput, load_registry
from inferq.workers.inference import ModelRunner, load_runner
from inferq.workers.layout import usable_cpus
from inferq.workers.weights import ensure_generated_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "scripts"
MODELS = ("chest-xray", "fraud")
_STARTUP_TIMEOUT_S = 300.0
_JOB_WAIT_S = 120.0
_FRAUD_FEATURES = 30
_REFERENCE_PAUSE_S = 0.05
_BULK_ROUNDS = 3
_FRAUD_LOW_LOAD_JOBS = 300

JobRunner = Callable[[int], None]
Session = Callable[[], AbstractContextManager[JobRunner]]


@dataclass(frozen=True)
class Counts:
    clients: int
    xray_jobs: int
    low_load_jobs: int
    limit_images: int
    fraud_jobs: int
    quick: bool
    # Where the models compute: "cpu", or "cuda" for the gpu pool (`--pool gpu`).
    device: str = "cpu"
    # inferq decodes chest-xray in a stage of its own, on CPU workers (`--two-stages`; always with the gpu pool).
    two_stages: bool = False


@dataclass(frozen=True)
class Candidate:
    processes: int
    threads: int
    batch: int


@dataclass(frozen=True)
class LimitRun:
    candidate: Candidate
    per_s: float
    single_latencies_s: list[float]


@dataclass
class Limit:
    """A model's limit search, then its best candidate's reruns (appended as they run)."""

    runs: list[LimitRun]
    # The best candidate run again, just before the system under test and just after it (`recheck_limit`).
    rechecks: list[LimitRun] = field(default_factory=list)

    @property
    def best(self) -> LimitRun:
        return max(self.runs, key=lambda run: run.per_s)

    @property
    def per_s(self) -> float:
        """The limit the ratios divide by: the mean of the rechecks where there are any. The search's best is the
        highest of several noisy figures, so it reads high by chance alone, and it was measured minutes before
        the system ran while this machine's speed drifts; the rechecks, run around the system, answer both."""
        if not self.rechecks:
            return self.best.per_s
        return statistics.fmean(run.per_s for run in self.rechecks)

    def best_single(self) -> LimitRun | None:
        """The one-process, batch-1 run with the lowest single-input p50: the reference for latency."""
        singles = [run for run in self.runs if run.single_latencies_s]
        return min(singles, key=lambda run: _percentile(run.single_latencies_s, 50), default=None)

    def single_run(self, threads: int) -> LimitRun | None:
        """The one-process, batch-1 run at `threads` torch threads: where single-input latency is measured."""
        for run in self.runs:
            if run.candidate == Candidate(1, threads, 1):
                return run
        return None


@dataclass
class Loop:
    """A closed loop of client threads: how long it took and each job's end-to-end latency."""

    jobs: int
    elapsed_s: float
    latencies_s: list[float]
    batch_sizes: list[int] = field(default_factory=list)
    # Low load only: the in-process reference's latency, measured just before each job (the same minutes).
    reference_latencies_s: list[float] = field(default_factory=list)
    # CPU milliseconds per job of each part of the system over the loop (`CpuMeter`), where measured.
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.jobs / self.elapsed_s


@dataclass
class SystemFigures:
    """What one system (naive or inferq) measured; None where it was not measured."""

    xray_saturation: Loop | None = None
    xray_low_load: Loop | None = None
    fraud_per_job: Loop | None = None
    fraud_bulk: Loop | None = None
    # One client, one job at a time: the per-job latency floor of each system's path (for the naive app, Celery's).
    fraud_low_load: Loop | None = None


# --- inputs


def _fraud_low_load_jobs(counts: Counts) -> int:
    return min(counts.fraud_jobs, _FRAUD_LOW_LOAD_JOBS)


def _xray_inputs(samples: list[Path], count: int) -> list[tuple[str, bytes]]:
    """`count` uploads cycling through the sample kinds (DICOM in three encodings, PNG 8/16-bit, JPEG)."""
    return [(samples[i % len(samples)].name, samples[i % len(samples)].read_bytes()) for i in range(count)]


def _fraud_inputs(count: int) -> list[list[dict[str, Any]]]:
    """`count` one-row jobs in the OIP form, deterministic."""
    [tensor] = fraud_example(rows=count)
    data = tensor["data"]
    return [
        [{**tensor, "shape": [1, _FRAUD_FEATURES], "data": data[i * _FRAUD_FEATURES : (i + 1) * _FRAUD_FEATURES]}]
        for i in range(count)
    ]


# --- 1. the limit: in-process, best configuration, each candidate in fresh subprocesses


def _candidates(model: str, usable: int, quick: bool, device: str) -> list[Candidate]:
    if device == "cuda":
        return _gpu_candidates(usable, quick)
    batches = (1, 16, 256) if model == "fraud" else (1, 4, 8)
    if quick:
        return [Candidate(1, 1, b) for b in batches[:2]]
    found = []
    for processes in sorted({1, usable}):
        for threads in sorted({1, max(1, usable // processes)}):
            found += [Candidate(processes, threads, batch) for batch in batches]
    return found


def _gpu_candidates(usable: int, quick: bool) -> list[Candidate]:
    """On a GPU the forward pass is cheap and decoding is what runs out: the search spreads decoding over processes
    (one thread each, all on the one device) and grows the batch."""
    batches = (1, 8, 32)
    if quick:
        return [Candidate(1, 1, b) for b in batches[:2]]
    return [Candidate(p, 1, b) for p in sorted({1, max(1, usable // 4), usable}) for b in batches]


def _warm_runner(spec: dict[str, Any], *, warm_inputs: int) -> tuple[ModelRunner, list[bytes]]:
    """A child's model at `threads` torch threads, its `count` inputs as stored blobs, warmed up on the first
    `warm_inputs` of them (every decoder)."""
    torch.set_num_threads(spec["threads"])
    settings = Settings()
    model_spec = load_registry(settings.registry_path).get_model(spec["model"])
    runner = load_runner(model_spec, settings, torch.device(spec.get("device", "cpu")))
    if isinstance(model_spec.input, ImageInput):
        samples = [Path(spec["samples_dir"]) / name for name in SAMPLE_NAMES]
        blobs = [data for _, data in _xray_inputs(samples, spec["count"])]
    else:
        uploads = [
            TensorUpload(inputs=[TensorPayload.model_validate(t) for t in j]) for j in _fraud_inputs(spec["count"])
        ]
        blobs = [validate_input(model_spec, u, settings).blob for u in uploads]
    runner.warm_up()
    for blob in blobs[:warm_inputs]:
        runner.run(blob)
    return runner, blobs


def _limit_child(spec_json: str) -> None:
    """One process of a candidate: load, warm up, say `ready`, wait for `go`, run its share, print the timings."""
    spec = json.loads(spec_json)
    runner, blobs = _warm_runner(spec, warm_inputs=max(spec["batch"] + 1, len(SAMPLE_NAMES)))
    mine = blobs[spec["index"] :: spec["processes"]]
    print("ready", flush=True)
    sys.stdin.readline()
    image = isinstance(runner.spec.input, ImageInput)
    latencies_s = []
    started = time.monotonic()
    for start in range(0, len(mine), spec["batch"]):
        sent = time.monotonic()
        tensors = [runner.prepare(blob)[0] for blob in mine[start : start + spec["batch"]]]
        runner.infer(np.stack(tensors) if image else np.concatenate(tensors))
        latencies_s.append(time.monotonic() - sent)
    finished = time.monotonic()
    print(json.dumps({"started": started, "finished": finished, "latencies_s": latencies_s}), flush=True)


def _run_candidate(model: str, candidate: Candidate, count: int, samples_dir: Path, log: Path, device: str) -> LimitRun:
    """Start the candidate's processes, release them together once all are warm; rate over the slowest."""
    children = []
    with log.open("ab") as stderr:
        for index in range(candidate.processes):
            spec = {
                "model": model,
                "threads": candidate.threads,
                "batch": candidate.batch,
                "index": index,
                "processes": candidate.processes,
                "count": count,
                "samples_dir": str(samples_dir),
                "device": device,
            }
            argv = [sys.executable, str(Path(__file__).resolve()), "--limit-child", json.dumps(spec)]
            children.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
            )
    try:
        for child in children:
            if child.stdout is None or child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a limit process of {candidate} did not start; see {log}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.close()
        reports = []
        for child in children:
            assert child.stdout is not None
            reports.append(json.loads(child.stdout.read().strip().splitlines()[-1]))
            child.wait(timeout=_JOB_WAIT_S)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    elapsed_s = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    singles = reports[0]["latencies_s"] if candidate.processes == 1 and candidate.batch == 1 else []
    return LimitRun(candidate, count / elapsed_s, singles)


def measure_limit(model: str, counts: Counts, usable: int, samples_dir: Path, tmp: Path) -> Limit:
    count = counts.fraud_jobs if model == "fraud" else counts.limit_images
    unit = "jobs" if model == "fraud" else "images"
    print(f"\nlimit search, {model}: {count} {unit} per candidate, each in fresh processes; {_load()}", flush=True)
    print(f"  {'processes':>9} {'threads':>7} {'batch':>5} {unit + '/s':>10} {'single p50 ms':>14}")
    runs = []
    for candidate in _candidates(model, usable, counts.quick, counts.device):
        run = _run_candidate(model, candidate, count, samples_dir, tmp / "limit.log", counts.device)
        runs.append(run)
        single = f"{_ms(_percentile(run.single_latencies_s, 50)):14.1f}" if run.single_latencies_s else ""
        print(f"  {candidate.processes:9d} {candidate.threads:7d} {candidate.batch:5d} {run.per_s:10.1f} {single}")
    limit = Limit(runs)
    best = limit.best.candidate
    print(
        f"  best: {best.processes} process(es) x {best.threads} thread(s), batch {best.batch}: {limit.best.per_s:.1f}"
    )
    return limit


def recheck_limit(model: str, limit: Limit, counts: Counts, samples_dir: Path, tmp: Path, when: str) -> None:
    """Run the search's best candidate again, in fresh processes and on twice the inputs, and keep the figure."""
    count = 2 * (counts.fraud_jobs if model == "fraud" else counts.limit_images)
    run = _run_candidate(model, limit.best.candidate, count, samples_dir, tmp / "limit.log", counts.device)
    limit.rechecks.append(run)
    print(f"limit of {model} again, {when}: {run.per_s:.1f} per s ({count} inputs); {_load()}", flush=True)


# --- the low-load reference, interleaved with the system's jobs


def _reference_child(spec_json: str) -> None:
    """The in-process reference at low load: one process at the best single-image thread count; for each index read
    from stdin, decode and run that image alone and print the seconds it took."""
    runner, blobs = _warm_runner({**json.loads(spec_json), "model": "chest-xray"}, warm_inputs=len(SAMPLE_NAMES))
    print("ready", flush=True)
    for line in sys.stdin:
        blob = blobs[int(line) % len(blobs)]
        sent = time.monotonic()
        runner.infer(runner.prepare(blob)[0][np.newaxis])
        print(time.monotonic() - sent, flush=True)


class Reference:
    """The reference process of `_reference_child`, alive for one system's low-load phase. On a shared machine the
    speed drifts by tens of percent within minutes, so the low-load overhead subtracts the reference measured beside
    each job, not the one of the limit search minutes earlier."""

    def __init__(self, threads: int, count: int, samples: list[Path], log: Path, device: str = "cpu") -> None:
        spec = {"threads": threads, "count": count, "samples_dir": str(samples[0].parent), "device": device}
        argv = [sys.executable, str(Path(__file__).resolve()), "--reference-child", json.dumps(spec)]
        with log.open("ab") as stderr:
            self._child = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        if self._read() != "ready":
            self.close()
            raise RuntimeError(f"the low-load reference did not start; see {log}")

    def _read(self) -> str:
        assert self._child.stdout is not None
        return self._child.stdout.readline().strip()

    def run(self, index: int) -> float:
        assert self._child.stdin is not None
        self._child.stdin.write(f"{index}\n")
        self._child.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        with suppress(OSError):
            if self._child.stdin is not None:
                self._child.stdin.close()
        try:
            self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


@contextmanager
def reference_process(
    threads: int, count: int, samples: list[Path], log: Path, device: str = "cpu"
) -> Iterator[Reference]:
    reference = Reference(threads, count, samples, log, device)
    try:
        yield reference
    finally:
        reference.close()


def low_load_loop(session: Session, reference: Reference, *, jobs: int) -> Loop:
    """One client, one job at a time; before each, the same image in-process (`reference`), then a pause so that its
    threads are idle again when the system's job starts."""
    latencies_s: list[float] = []
    reference_s: list[float] = []
    started = time.perf_counter()
    with session() as run:
        for index in range(jobs):
            reference_s.append(reference.run(index))
            time.sleep(_REFERENCE_PAUSE_S)
            sent = time.perf_counter()
            run(index)
            latencies_s.append(time.perf_counter() - sent)
    elapsed_s = time.perf_counter() - started
    return Loop(jobs=jobs, elapsed_s=elapsed_s, latencies_s=latencies_s, reference_latencies_s=reference_s)


# --- client loops, shared by both systems


def closed_loop(session: Session, *, clients: int, jobs: int) -> Loop:
    """`clients` threads, each with its own session, run jobs one after another until `jobs` are done in all."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies_s: list[float] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        try:
            with session() as run:
                ready.wait()
                while True:
                    with lock:
                        index = next(counter)
                    if index >= jobs:
                        return
                    sent = time.perf_counter()
                    run(index)
                    latency_s = time.perf_counter() - sent
                    with lock:
                        latencies_s.append(latency_s)
        except threading.BrokenBarrierError:
            return
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    with suppress(threading.BrokenBarrierError):
        ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed_s = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} client thread(s) failed; the first: {errors[0]!r}") from errors[0]
    return Loop(jobs=jobs, elapsed_s=elapsed_s, latencies_s=latencies_s)


class CpuMeter:
    """The CPU each part of a system spends over a loop, per job: every process of a part counted (a worker's
    nodes are children of its command), read from /proc, and this process's own as the clients'. Where a system
    falls short of the limit on shared cores, this says which part took the cores."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self._roots = {name: pids for name, pids in parts.items() if pids}

    def measure(self, run: Callable[[], Loop]) -> Loop:
        before, host_before = self._cpu_s(), host_cpu_s(os.sched_getaffinity(0))
        loop = run()
        after, host_after = self._cpu_s(), host_cpu_s(os.sched_getaffinity(0))
        loop.cpu_ms = {name: _ms(after[name] - before[name]) / loop.jobs for name in after}
        host = {name: _ms(host_after[name] - host_before[name]) / loop.jobs for name in host_after}
        # What the usable cores did that none of the system's parts did: other processes, the kernel's own threads.
        loop.cpu_ms["other"] = max(0.0, host["busy"] - sum(loop.cpu_ms.values()))
        loop.cpu_ms["idle"], loop.cpu_ms["stolen"] = host["idle"], host["stolen"]
        return loop

    def _cpu_s(self) -> dict[str, float]:
        return {**cpu_s_by_part(self._roots), "clients": time.process_time()}


# --- 2. the naive Celery app


def _naive_session(redis_url: str, task_name: str, args_of: Callable[[int], list[Any]]) -> Session:
    from naive_celery_app import create_app

    @contextmanager
    def session() -> Iterator[JobRunner]:
        app = create_app(redis_url)
        task = app.tasks[task_name]

        def run(index: int) -> None:
            task.delay(*args_of(index)).get(timeout=_JOB_WAIT_S)

        try:
            yield run
        finally:
            app.close()

    return session


def _wait_naive_ready(redis_url: str, stack: ServiceStack) -> None:
    """Until the worker answers a ping (its pool's processes load the models afterwards: the warm-up waits)."""
    from naive_celery_app import create_app

    app = create_app(redis_url)
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline and not stack.dead():
            if app.control.ping(timeout=1.0):
                return
    finally:
        app.close()
    raise RuntimeError(f"the naive Celery worker did not start (dead: {stack.dead()})")


def measure_naive(
    models: list[str], counts: Counts, redis: EmbeddedRedis, samples: list[Path], tmp: Path, reference_threads: int
) -> SystemFigures:
    from naive_celery_app import CHEST_XRAY_TASK, DEVICE_ENV, FRAUD_TASK, MODELS_ENV

    figures = SystemFigures()
    redis_url = redis.url
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": redis_url,
        # Ahead of the caller's own path, not instead of it: a host may keep the dependencies in a folder of its own.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        DEVICE_ENV: counts.device,
        MODELS_ENV: ",".join(models),
    }
    stack = ServiceStack(env, tmp / "naive-logs")
    try:
        worker = stack.start_command("naive", [sys.executable, "-m", "celery", "-A", "naive_celery_app", "worker"])
        meter = CpuMeter({"workers": [worker.pid], "API": [], "Redis": [redis.pid]})
        _wait_naive_ready(redis_url, stack)
        print(f"\nnaive Celery app: `celery -A naive_celery_app worker` (prefork, defaults); {_load()}", flush=True)
        if "chest-xray" in models:
            uploads = _xray_inputs(samples, max(counts.xray_jobs, counts.low_load_jobs))
            encoded = [base64.b64encode(data).decode("ascii") for _, data in uploads]
            session = _naive_session(redis_url, CHEST_XRAY_TASK, lambda i: [encoded[i % len(encoded)]])
            closed_loop(session, clients=counts.clients, jobs=counts.clients)  # warm up (first: model loads)
            figures.xray_saturation = meter.measure(
                lambda: closed_loop(session, clients=counts.clients, jobs=counts.xray_jobs)
            )
            with reference_process(
                reference_threads, counts.low_load_jobs, samples, tmp / "reference.log", counts.device
            ) as ref:
                figures.xray_low_load = low_load_loop(session, ref, jobs=counts.low_load_jobs)
        if "fraud" in models:
            rows = [job[0]["data"] for job in _fraud_inputs(counts.fraud_jobs)]
            session = _naive_session(redis_url, FRAUD_TASK, lambda i: [[rows[i]]])
            closed_loop(session, clients=counts.clients, jobs=counts.clients)
            figures.fraud_per_job = meter.measure(
                lambda: closed_loop(session, clients=counts.clients, jobs=counts.fraud_jobs)
            )
            figures.fraud_low_load = closed_loop(session, clients=1, jobs=_fraud_low_load_jobs(counts))
    except BaseException:
        stack.print_log_tails()
        raise
    finally:
        stack.stop()
    return figures


# --- 3. inferq


class InferqSession:
    """Makes a client thread's session: its own `InferqClient`, running one job after another to its end with
    `run_job` (the README's two ways: submit then long-poll, or the synchronous `submit_and_wait`). Keeps the batch
    size each job ran in (shared by the threads: appends are atomic)."""

    def __init__(
        self, api_url: str, api_key: str, model: str, run_job: Callable[[InferqClient, int], dict[str, Any]]
    ) -> None:
        self._api_url, self._api_key, self._model, self._run_job = api_url, api_key, model, run_job
        self.batch_sizes: list[int] = []

    @contextmanager
    def __call__(self) -> Iterator[JobRunner]:
        with InferqClient(self._api_url, api_key=self._api_key) as client:

            def run(index: int) -> None:
                job = self._run_job(client, index)
                if job["status"] != "succeeded":
                    raise RuntimeError(f"a {self._model} job ended {job['status']}: {job.get('error')}")
                self.batch_sizes.append(int(job.get("batch_size") or 1))

            yield run

    def loop(self, *, clients: int, jobs: int) -> Loop:
        loop = closed_loop(self, clients=clients, jobs=jobs)
        loop.batch_sizes = list(self.batch_sizes)
        return loop


def xray_job(uploads: list[tuple[str, bytes]]) -> Callable[[InferqClient, int], dict[str, Any]]:
    """The hospital's way to run job `index`: upload, then long-poll the job's status."""

    def run(client: InferqClient, index: int) -> dict[str, Any]:
        name, data = uploads[index % len(uploads)]
        return client.result(client.submit("chest-xray", data, filename=name), wait_s=_JOB_WAIT_S)

    return run


def fraud_job(inputs: list[list[dict[str, Any]]]) -> Callable[[InferqClient, int], dict[str, Any]]:
    """The bank's way to run job `index`: one synchronous call (`Prefer: wait`) that answers with the scored job."""

    def run(client: InferqClient, index: int) -> dict[str, Any]:
        return client.submit_and_wait("fraud", inputs=inputs[index], wait_s=_JOB_WAIT_S)

    return run


def _two_stage_registry(tmp: Path) -> Path:
    """The registry with chest-xray decoded in a stage of its own (`preprocess = "separate"`), as the README
    tells a GPU host to run it."""
    text = Settings().registry_path.read_text()
    header = "[models.chest-xray]\n"
    if header not in text:
        raise RuntimeError(f"the registry has no {header.strip()} table to split into two stages")
    path = tmp / "models-two-stages.toml"
    path.write_text(text.replace(header, header + 'preprocess = "separate"\n', 1))
    if load_registry(path).get_model("chest-xray").prep_queue_name is None:
        raise RuntimeError("chest-xray did not get a decoding stage of its own")
    return path


def _fraud_bulk(client: InferqClient, jobs: list[list[dict[str, Any]]]) -> Loop:
    started = time.perf_counter()
    entries = client.submit_many("fraud", inputs=jobs)
    refused = [e for e in entries if "job_id" not in e]
    if refused:
        raise RuntimeError(f"{len(refused)} bulk jobs refused; the first: {refused[0]}")
    done = client.results([e["job_id"] for e in entries], wait_s=_JOB_WAIT_S)
    elapsed_s = time.perf_counter() - started
    failed = [job for job in done if job.get("status") != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} bulk fraud jobs did not succeed; the first: {failed[0]}")
    return Loop(jobs=len(jobs), elapsed_s=elapsed_s, latencies_s=[], batch_sizes=[int(j["batch_size"]) for j in done])


def measure_inferq(
    models: list[str], counts: Counts, redis: EmbeddedRedis, samples: list[Path], tmp: Path, reference_threads: int
) -> SystemFigures:
    figures = SystemFigures()
    redis_url = redis.url
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    served = ",".join(models)
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_API_PORT": str(api_port),
        "INFERQ_SERVED_MODELS": served,
    }
    pool = "gpu" if counts.device == "cuda" else "cpu"
    two_stages = counts.two_stages and "chest-xray" in models  # fraud has no decoding to split off
    if two_stages:
        env["INFERQ_REGISTRY_PATH"] = str(_two_stage_registry(tmp))
    keys = redis_client(redis_url, decode=True)
    try:
        api_key = ApiKeyStore(keys).create("bench", frozenset({"submit", "read"})).key
    finally:
        keys.close()
    stack = ServiceStack(env, tmp / "inferq-logs")
    try:
        if two_stages:  # the README's GPU host: CPU workers decode, the model's workers batch and compute
            workers = [
                stack.start("worker", "worker", "--pool", pool, "--models", served, "--stage", "model"),
                stack.start("prep", "worker", "--pool", "cpu", "--models", served, "--stage", "prep"),
            ]
            command = (
                f"`inferq api` + `inferq worker --pool {pool} --models {served} --stage model` + `inferq worker"
                f" --pool cpu --models {served} --stage prep` (defaults otherwise), {served} with preprocess ="
                ' "separate"'
            )
        else:
            workers = [stack.start("worker", "worker", "--pool", pool, "--models", served)]
            command = f"`inferq api` + `inferq worker --pool {pool} --models {served}` (defaults)"
        api = stack.start("api", "api")
        meter = CpuMeter({"workers": [w.pid for w in workers], "API": [api.pid], "Redis": [redis.pid]})
        stack.wait_http(f"{api_url}/readyz", timeout_s=_STARTUP_TIMEOUT_S)
        print(f"\ninferq: {command}; {_load()}", flush=True)
        if "chest-xray" in models:
            uploads = _xray_inputs(samples, max(counts.xray_jobs, counts.low_load_jobs))

            submit_xray = xray_job(uploads)
            InferqSession(api_url, api_key, "chest-xray", submit_xray).loop(clients=counts.clients, jobs=counts.clients)
            session = InferqSession(api_url, api_key, "chest-xray", submit_xray)
            figures.xray_saturation = meter.measure(lambda: session.loop(clients=counts.clients, jobs=counts.xray_jobs))
            session = InferqSession(api_url, api_key, "chest-xray", submit_xray)
            with reference_process(
                reference_threads, counts.low_load_jobs, samples, tmp / "reference.log", counts.device
            ) as ref:
                figures.xray_low_load = low_load_loop(session, ref, jobs=counts.low_load_jobs)
            figures.xray_low_load.batch_sizes = list(session.batch_sizes)
        if "fraud" in models:
            jobs = _fraud_inputs(counts.fraud_jobs)

            submit_fraud = fraud_job(jobs)
            InferqSession(api_url, api_key, "fraud", submit_fraud).loop(clients=counts.clients, jobs=counts.clients)
            session = InferqSession(api_url, api_key, "fraud", submit_fraud)
            figures.fraud_per_job = meter.measure(lambda: session.loop(clients=counts.clients, jobs=counts.fraud_jobs))
            figures.fraud_low_load = closed_loop(session, clients=1, jobs=_fraud_low_load_jobs(counts))
            with InferqClient(api_url, api_key=api_key) as client:
                # A bulk run lasts about a second: the median of a few says more on a noisy machine than one.
                rounds = [meter.measure(lambda: _fraud_bulk(client, jobs)) for _ in range(_BULK_ROUNDS)]
                figures.fraud_bulk = sorted(rounds, key=lambda loop: loop.per_s)[len(rounds) // 2]
    except BaseException:
        stack.print_log_tails()
        raise
    finally:
        stack.stop()
    return figures


# --- the report


def _load() -> str:
    """The load average: other work on these cores makes every figure noisier (and multi-threaded torch slower)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def _percentile(values: list[float], percent: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(percent) - 1]


def _ms(seconds: float) -> float:
    return seconds * 1000


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _batch_note(loop: Loop | None) -> str:
    if loop is None or not loop.batch_sizes:
        return ""
    return f"batch median {statistics.median(loop.batch_sizes):g}, max {max(loop.batch_sizes)}"


Row = tuple[str, str, float | None, float | None, float | None, str]


def _rows(limits: dict[str, Limit], naive: SystemFigures, inferq: SystemFigures, counts: Counts) -> list[Row]:
    rows: list[Row] = []
    if "chest-xray" in limits:
        limit = limits["chest-xray"]
        rows.append(
            (
                f"chest-xray saturation, {counts.clients} clients",
                "jobs/s",
                limit.per_s,
                naive.xray_saturation.per_s if naive.xray_saturation else None,
                inferq.xray_saturation.per_s if inferq.xray_saturation else None,
                _batch_note(inferq.xray_saturation),
            )
        )
        single = limit.best_single()
        references = [_reference_p50(loop) for loop in (naive.xray_low_load, inferq.xray_low_load)]
        for percent in (50, 99):
            reference = _ms(_percentile(single.single_latencies_s, percent)) if single else None
            naive_ms = _ms(_percentile(naive.xray_low_load.latencies_s, percent)) if naive.xray_low_load else None
            inferq_ms = _ms(_percentile(inferq.xray_low_load.latencies_s, percent)) if inferq.xray_low_load else None
            rows.append((f"chest-xray low load p{percent}, 1 client", "ms", reference, naive_ms, inferq_ms, ""))
            if percent == 50:
                rows.append(("  in-process p50, measured beside each job", "ms", None, *references, ""))
            rows.append(
                (
                    f"  overhead p{percent} (minus in-process p50 above)",
                    "ms",
                    None,
                    *(_minus(system, base) for system, base in zip((naive_ms, inferq_ms), references, strict=True)),
                    _batch_note(inferq.xray_low_load) if percent == 50 else "",
                )
            )
    if "fraud" in limits:
        best = limits["fraud"].per_s
        naive_rate = naive.fraud_per_job.per_s if naive.fraud_per_job else None
        rows.append(
            (
                f"fraud one-row jobs, {counts.clients} clients",
                "jobs/s",
                best,
                naive_rate,
                inferq.fraud_per_job.per_s if inferq.fraud_per_job else None,
                _batch_note(inferq.fraud_per_job),
            )
        )
        rows.append(
            (
                f"fraud {counts.fraud_jobs} one-row jobs, bulk (median of {_BULK_ROUNDS})",
                "jobs/s",
                best,
                naive_rate,
                inferq.fraud_bulk.per_s if inferq.fraud_bulk else None,
                _batch_note(inferq.fraud_bulk) + " (naive: its per-job rate; it has no bulk)",
            )
        )
        single = limits["fraud"].best_single()
        loops = (naive.fraud_low_load, inferq.fraud_low_load)
        rows.append(
            (
                "fraud low load p50, 1 client",
                "ms",
                _ms(_percentile(single.single_latencies_s, 50)) if single else None,
                *(_ms(_percentile(loop.latencies_s, 50)) if loop else None for loop in loops),
                "naive: Celery's own round trip, no HTTP; inferq: one synchronous call",
            )
        )
    return rows


def _reference_p50(loop: Loop | None) -> float | None:
    return _ms(_percentile(loop.reference_latencies_s, 50)) if loop and loop.reference_latencies_s else None


def _minus(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def print_report(limits: dict[str, Limit], naive: SystemFigures, inferq: SystemFigures, counts: Counts) -> None:
    print("\nresults (latency rows: lower is better, ratios there are system/limit of the end-to-end time)")
    header = f"{'row':44} {'unit':6} {'limit':>9} {'naive':>9} {'inferq':>9}"
    header += f" {'naive/limit':>11} {'inferq/limit':>12} {'inferq/naive':>12}  notes"
    print(header)
    for name, unit, limit_value, naive_value, inferq_value, note in _rows(limits, naive, inferq, counts):
        overhead = name.strip().startswith(("overhead", "in-process"))
        line = f"{name:44} {unit:6} {_cell(limit_value):>9} {_cell(naive_value):>9} {_cell(inferq_value):>9}"
        naive_limit = "-" if overhead else _ratio(naive_value, limit_value)
        inferq_limit = "-" if overhead else _ratio(inferq_value, limit_value)
        line += f" {naive_limit:>11} {inferq_limit:>12} {_ratio(inferq_value, naive_value):>12}  {note}"
        print(line)
    for model, limit in limits.items():
        best = limit.best.candidate
        again = " and ".join(f"{run.per_s:.1f}" for run in limit.rechecks)
        print(
            f"limit of {model}: {best.processes} process(es) x {best.threads} thread(s), batch {best.batch}; "
            f"{limit.best.per_s:.1f} per s in the search, {again or 'not'} run again around the systems: "
            f"{limit.per_s:.1f} in the rows above"
        )
    single = limits["chest-xray"].single_run(1) if "chest-xray" in limits else None
    multi = limits["chest-xray"].single_run(usable_cpus()) if "chest-xray" in limits else None
    if single and multi and multi is not single:
        one, many = _percentile(single.single_latencies_s, 50), _percentile(multi.single_latencies_s, 50)
        print(f"in-process single image p50: {_ms(one):.1f} ms on 1 thread, {_ms(many):.1f} ms on {usable_cpus()}")
    print(f"low-load reference (overhead rows): one process on {_reference_threads(limits)} thread(s)")
    _print_cpu(naive, inferq, counts)
    if counts.device == "cpu":  # a GPU's limit is not the cores' to share
        _print_ceiling(limits, inferq)


_CPU_PARTS = ("workers", "API", "Redis", "clients")
# Where the rest of the offered CPU went: not counted in `all`.
_HOST_PARTS = ("other", "idle", "stolen")


def _print_cpu(naive: SystemFigures, inferq: SystemFigures, counts: Counts) -> None:
    """Where each system's CPU went per job; `offered` is what the usable cores gave per job over the loop."""
    print(
        "\nCPU per job (ms; every process of each part, from /proc; offered: usable CPUs x wall time / jobs; other: the"
        " usable CPUs' busy time that no part took; idle; stolen: taken by the hypervisor)"
    )
    columns = (*_CPU_PARTS, "all", *_HOST_PARTS, "offered")
    print(f"{'row':44} {'system':7}" + "".join(f" {part:>8}" for part in columns))
    named = [
        (f"chest-xray saturation, {counts.clients} clients", "xray_saturation"),
        (f"fraud one-row jobs, {counts.clients} clients", "fraud_per_job"),
        (f"fraud {counts.fraud_jobs} one-row jobs, bulk (median)", "fraud_bulk"),
    ]
    for row, attribute in named:
        for system, figures in (("naive", naive), ("inferq", inferq)):
            loop: Loop | None = getattr(figures, attribute)
            if loop is None or not loop.cpu_ms:
                continue
            cells = [loop.cpu_ms.get(part) for part in _CPU_PARTS]
            offered = _ms(loop.elapsed_s) * usable_cpus() / loop.jobs
            host = [loop.cpu_ms.get(part) for part in _HOST_PARTS]
            values = [*cells, sum(c for c in cells if c is not None), *host, offered]
            print(f"{row:44} {system:7}" + "".join(f" {_cell(value):>8}" for value in values))


def _print_ceiling(limits: dict[str, Limit], inferq: SystemFigures) -> None:
    """What the parts around the workers alone allow on these cores: were the workers as lean as the limit (its CPU
    per film, all cores busy), the API, Redis and the clients' CPU per film would still hold inferq to this share
    of the limit, since here they share the cores the limit has to itself."""
    loop = inferq.xray_saturation
    if "chest-xray" not in limits or loop is None or not loop.cpu_ms:
        return
    limit_ms = _ms(usable_cpus() / limits["chest-xray"].per_s)
    around_ms = sum(loop.cpu_ms.get(part, 0.0) for part in ("API", "Redis", "clients"))
    print(
        f"chest-xray at saturation: the limit spends {limit_ms:.1f} ms of CPU a film; inferq's API, Redis and clients"
        f" {around_ms:.1f} more on the same cores, which alone caps inferq at {limit_ms / (limit_ms + around_ms):.2f}"
        " of the limit with workers as lean as it"
    )


def _reference_threads(limits: dict[str, Limit]) -> int:
    """The thread count of the lowest single-image p50 in the limit search (on an idle host: every core)."""
    best_single = limits["chest-xray"].best_single() if "chest-xray" in limits else None
    return best_single.candidate.threads if best_single else usable_cpus()


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS, help="benchmark one model only")
    parser.add_argument("--quick", action="store_true", help="small counts and a reduced search: a smoke run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--xray-jobs", type=int, help="chest-xray jobs at saturation (default 120; gpu pool 2000)")
    parser.add_argument("--low-load-jobs", type=int, default=30, help="chest-xray jobs at low load (1 client)")
    parser.add_argument(
        "--limit-images", type=int, help="chest-xray images per limit candidate (default 48; gpu pool 1024)"
    )
    parser.add_argument("--fraud-jobs", type=int, default=2000, help="fraud one-row jobs (limit, naive and inferq)")
    parser.add_argument(
        "--two-stages",
        action="store_true",
        help="inferq decodes chest-xray on CPU workers of its own (preprocess = separate); always with --pool gpu",
    )
    parser.add_argument(
        "--pool",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: chest-xray on the CUDA device, in every system (`inferq worker --pool gpu`)",
    )
    parser.add_argument("--limit-child", help=argparse.SUPPRESS)
    parser.add_argument("--reference-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _counts(args: argparse.Namespace) -> Counts:
    device = "cuda" if args.pool == "gpu" else "cpu"
    two_stages = args.two_stages or device == "cuda"
    if args.quick:
        return Counts(
            clients=4,
            xray_jobs=6,
            low_load_jobs=3,
            limit_images=6,
            fraud_jobs=40,
            quick=True,
            device=device,
            two_stages=two_stages,
        )
    # A GPU computes a film in well under a millisecond: runs of the CPU's length would end before they settle.
    gpu = device == "cuda"
    return Counts(
        clients=args.clients,
        xray_jobs=args.xray_jobs or (2000 if gpu else 120),
        low_load_jobs=args.low_load_jobs,
        limit_images=args.limit_images or (1024 if gpu else 48),
        fraud_jobs=args.fraud_jobs,
        quick=False,
        device=device,
        two_stages=two_stages,
    )


def _models(args: argparse.Namespace) -> list[str]:
    """The models to measure; the gpu pool measures the one declared for it, and only where CUDA is there."""
    if args.pool == "cpu":
        return [args.only] if args.only else list(MODELS)
    if args.only == "fraud":
        raise SystemExit("bench: fraud is a cpu-pool model; --pool gpu measures chest-xray")
    if not torch.cuda.is_available():
        raise SystemExit("bench: --pool gpu needs a CUDA device, and torch finds none on this host")
    return ["chest-xray"]


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds the `finally` blocks, which stop every process this run started.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = _parse_args()
    if args.limit_child:
        _limit_child(args.limit_child)
        return
    if args.reference_child:
        _reference_child(args.reference_child)
        return
    began = time.monotonic()
    counts = _counts(args)
    models = _models(args)
    usable = usable_cpus()
    settings = Settings()
    registry = load_registry(settings.registry_path)
    for model in models:
        ensure_generated_weights(registry.get_model(model), settings)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"inferq benchmark, {now}: {usable} usable CPU(s) (os.cpu_count {os.cpu_count()}), torch {torch.__version__}")
    print(f"{platform.platform()}; python {platform.python_version()}; counts {counts}")
    if counts.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)} (of {torch.cuda.device_count()} visible)")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        samples = write_samples(tmp / "samples")
        limits = {model: measure_limit(model, counts, usable, tmp / "samples", tmp) for model in models}
        with EmbeddedRedis(tmp / "redis") as redis_server:
            threads = _reference_threads(limits)
            naive = measure_naive(models, counts, redis_server, samples, tmp, threads)
            for model in models:
                recheck_limit(model, limits[model], counts, tmp / "samples", tmp, "before inferq")
            inferq = measure_inferq(models, counts, redis_server, samples, tmp, threads)
            for model in models:
                recheck_limit(model, limits[model], counts, tmp / "samples", tmp, "after inferq")
    print_report(limits, naive, inferq, counts)
    print(f"at the end: {_load()}")
    print(f"bench took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
