"""Many waiting clients against the workers: what a thousand clients waiting for their jobs cost the jobs that run.

Waiting must not slow the workers down. A hospital's upload stations each wait
for their own study, and most of those studies are still queued; meanwhile the workers compute other jobs on the
same cores as the API and Redis.

One stack, as `bench.py` runs it: a private Redis, `inferq api` and `inferq worker --pool cpu --models MODEL` with
its defaults. The measured load is `bench.py`'s: 16 client threads, each running one job after another the way the
README says (a fraud check as one synchronous `submit_and_wait`; an X-ray submitted, then long-polled), with the
CPU each part spent per job. Conditions:

- alone: nobody else is waiting;
- long-poll: WAITERS more clients (a process of their own, one thread and one `InferqClient` each) wait for jobs of
  their own with `result(job_id, wait_s=...)`, as the README tells users to. Their jobs belong to the other model,
  which no worker serves in this run, so they stay queued and the clients stay waiting throughout;
- polling, for contrast: the same clients ask for their job's status every POLL_S seconds instead, as a client does
  that does not long-poll.

Each round runs alone and long-poll, in turns of order (this machine's speed drifts within minutes); polling runs
once at the end, on a tenth of the jobs. Before each run with waiters, a quiet window with only the waiters there:
Redis commands per second beyond the idle stack's, and the CPU of the API, Redis, the workers and the waiters'
process. The report gives the medians over the rounds and each condition's ratio to alone.

    .venv/bin/python scripts/bench_waiting.py                  # fraud, 1,000 waiters, 5 rounds (about 5 minutes)
    .venv/bin/python scripts/bench_waiting.py --model chest-xray
    .venv/bin/python scripts/bench_waiting.py --quick          # 100 waiters, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench
from procfs import cpu_s_by_part

from inferq.config import Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.redis_server import EmbeddedRedis, free_port
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.protocol.connections import redis_client
from inferq.protocol.registry import load_registry
from inferq.workers.layout import usable_cpus
from inferq.workers.weights import ensure_generated_weights

CONDITIONS = ("alone", "long-poll", "polling")
# Each round runs these two, in turns of order; polling runs once, at the end.
CONDITIONS_ALTERNATED = ("alone", "long-poll")
_STARTUP_TIMEOUT_S = 300.0
_PARK_TIMEOUT_S = 120.0
# Long enough that the waiters never give up during a run: `result` splits it into requests of the server's
# `max_wait_s` each.
_WAITER_WAIT_S = 24 * 3600.0
# A waiter thread needs little stack; a thousand of them at the default 8 MiB would reserve 8 GiB of address space.
_WAITER_STACK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Plan:
    model: str
    waiters: int
    rounds: int
    clients: int
    jobs: int
    quiet_s: float
    poll_s: float


@dataclass
class Quiet:
    """A quiet window with only the waiters there: Redis commands per second beyond the idle stack's, CPU percent of
    one core by part."""

    commands_per_s: float
    cpu_percent: dict[str, float]


@dataclass
class Measurement:
    condition: str
    per_s: float
    # CPU milliseconds per job of each part over the loaded run.
    cpu_ms: dict[str, float]
    quiet: Quiet | None


# --- the waiters' process


def _waiters_child(spec_json: str) -> None:
    """Wait for each job in a thread of its own until killed; say `parked` once every thread has asked once."""
    spec = json.loads(spec_json)
    threading.stack_size(_WAITER_STACK_BYTES)
    asked = threading.Semaphore(0)

    def wait_for(job_id: str) -> None:
        with InferqClient(spec["api_url"], api_key=spec["api_key"]) as client:
            client.status(job_id)  # connected and answered once: then the waiting begins
            asked.release()
            if spec["mode"] == "long-poll":
                client.result(job_id, wait_s=_WAITER_WAIT_S)
            else:
                while client.status(job_id)["status"] == "queued":
                    time.sleep(spec["poll_s"])

    for job_id in spec["job_ids"]:
        threading.Thread(target=wait_for, args=(job_id,), daemon=True).start()
    for _ in spec["job_ids"]:
        asked.acquire()
    print("parked", flush=True)
    sys.stdin.read()  # until the parent closes it, or kills this process


@contextmanager
def waiters(mode: str, api_url: str, api_key: str, job_ids: list[str], poll_s: float, log: Path) -> Iterator[int]:
    """The waiters' process, parked (every thread has asked once and is waiting); yields its pid."""
    spec = {"mode": mode, "api_url": api_url, "api_key": api_key, "job_ids": job_ids, "poll_s": poll_s}
    argv = [sys.executable, str(Path(__file__).resolve()), "--waiters-child", json.dumps(spec)]
    with log.open("ab") as stderr:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert child.stdout is not None
        line = _readline(child, _PARK_TIMEOUT_S)
        if line != "parked":
            raise RuntimeError(f"the {mode} waiters did not park (said {line!r}); see {log}")
        # The first `status` is answered; each thread's waiting request leaves a moment later.
        time.sleep(1.0)
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _readline(child: subprocess.Popen[str], timeout_s: float) -> str:
    lines: list[str] = []
    assert child.stdout is not None
    reader = threading.Thread(target=lambda: lines.append(child.stdout.readline().strip()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""


# --- measuring


def _redis_commands(url: str) -> int:
    client = redis_client(url, decode=True)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def quiet_window(redis_url: str, parts: dict[str, list[int]], seconds: float) -> tuple[float, dict[str, float]]:
    """Redis commands per second and CPU percent (of one core) by part over `seconds` of no load."""
    commands, cpu = _redis_commands(redis_url), cpu_s_by_part(parts)
    time.sleep(seconds)
    commands_after, cpu_after = _redis_commands(redis_url), cpu_s_by_part(parts)
    # The INFO call that ends the window counts itself.
    per_s = (commands_after - commands - 1) / seconds
    return per_s, {name: 100.0 * (cpu_after[name] - cpu[name]) / seconds for name in cpu}


class Rig:
    """The running stack and the load it measures."""

    def __init__(self, plan: Plan, redis_server: EmbeddedRedis, tmp: Path) -> None:
        self.plan = plan
        self.redis_url = redis_server.url
        self.redis_pid = redis_server.pid
        self.tmp = tmp
        self.parked_model = "fraud" if plan.model == "chest-xray" else "chest-xray"
        self.samples = write_samples(tmp / "samples")
        keys = redis_client(self.redis_url, decode=True)
        try:
            self.api_key = ApiKeyStore(keys).create("bench", frozenset({"submit", "read"})).key
        finally:
            keys.close()
        self.api_url = f"http://127.0.0.1:{free_port()}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "INFERQ_REDIS_URL": self.redis_url,
            "INFERQ_API_PORT": self.api_url.rsplit(":", 1)[1],
            "INFERQ_SERVED_MODELS": self.plan.model,
        }

    def park_jobs(self) -> list[str]:
        """The waiters' jobs: of the model no worker serves in this run, so they stay queued."""
        with InferqClient(self.api_url, api_key=self.api_key) as client:
            if self.parked_model == "fraud":
                entries = client.submit_many("fraud", inputs=bench._fraud_inputs(self.plan.waiters))
            else:
                files = [data for _, data in bench._xray_inputs(self.samples, self.plan.waiters)]
                entries = client.submit_many("chest-xray", files)
        refused = [entry for entry in entries if "job_id" not in entry]
        if refused:
            raise RuntimeError(f"{len(refused)} waiters' jobs refused; the first: {refused[0]}")
        return [str(entry["job_id"]) for entry in entries]

    def load(self) -> bench.InferqSession:
        """`bench.py`'s load on inferq: 16 client threads, each running one job after another as the README says."""
        if self.plan.model == "fraud":
            run_job = bench.fraud_job(bench._fraud_inputs(self.plan.jobs))
        else:
            run_job = bench.xray_job(bench._xray_inputs(self.samples, self.plan.jobs))
        return bench.InferqSession(self.api_url, self.api_key, self.plan.model, run_job)

    def run_load(self, parts: dict[str, list[int]], jobs: int) -> bench.Loop:
        session = self.load()
        return bench.CpuMeter(parts).measure(lambda: session.loop(clients=self.plan.clients, jobs=jobs))


def measure(rig: Rig, condition: str, parked: list[str], parts: dict[str, list[int]], idle_per_s: float) -> Measurement:
    plan = rig.plan
    if condition == "alone":
        loop = rig.run_load(parts, plan.jobs)
        return Measurement(condition, loop.per_s, loop.cpu_ms, None)
    with waiters(condition, rig.api_url, rig.api_key, parked, plan.poll_s, rig.tmp / "waiters.log") as pid:
        with_waiters = {**parts, "waiters": [pid]}
        commands_per_s, cpu = quiet_window(rig.redis_url, with_waiters, plan.quiet_s)
        quiet = Quiet(commands_per_s - idle_per_s, cpu)
        # Polling starves the API: a tenth of the jobs says as much, in a tenth of the time.
        loop = rig.run_load(with_waiters, plan.jobs if condition == "long-poll" else max(1, plan.jobs // 10))
        return Measurement(condition, loop.per_s, loop.cpu_ms, quiet)


def _measured(
    rig: Rig, condition: str, parked: list[str], parts: dict[str, list[int]], idle_per_s: float, round_index: int
) -> Measurement:
    measurement = measure(rig, condition, parked, parts, idle_per_s)
    api_ms = measurement.cpu_ms.get("API", 0.0)
    print(
        f"  round {round_index + 1}, {condition}: {measurement.per_s:.1f} {_unit(rig.plan)} (the API took {api_ms:.2f}"
        " ms of CPU a job)",
        flush=True,
    )
    return measurement


def run(plan: Plan) -> list[Measurement]:
    settings = Settings()
    registry = load_registry(settings.registry_path)
    ensure_generated_weights(registry.get_model(plan.model), settings)
    with tempfile.TemporaryDirectory() as tmp_dir, EmbeddedRedis(Path(tmp_dir) / "redis") as redis_server:
        tmp = Path(tmp_dir)
        rig = Rig(plan, redis_server, tmp)
        stack = ServiceStack(rig.env(), tmp / "logs")
        try:
            worker = stack.start("worker", "worker", "--pool", "cpu", "--models", plan.model)
            api = stack.start("api", "api")
            stack.wait_http(f"{rig.api_url}/readyz", timeout_s=_STARTUP_TIMEOUT_S)
            parts = {"API": [api.pid], "Redis": [rig.redis_pid], "workers": [worker.pid]}
            print(
                f"stack up: `inferq api` + `inferq worker --pool cpu --models {plan.model}` (defaults); {bench._load()}"
            )
            rig.load().loop(clients=plan.clients, jobs=plan.clients)  # warm-up
            parked = rig.park_jobs()
            time.sleep(1.0)  # the bulk submission's last writes
            idle_per_s, idle_cpu = quiet_window(rig.redis_url, parts, plan.quiet_s)
            print(
                f"idle stack, no waiters: {idle_per_s:.0f} Redis commands/s (heartbeats, broker polling); CPU"
                f" {_percents(idle_cpu)}"
            )
            measurements = []
            for round_index in range(plan.rounds):
                order = CONDITIONS_ALTERNATED if round_index % 2 == 0 else CONDITIONS_ALTERNATED[::-1]
                measurements += [
                    _measured(rig, condition, parked, parts, idle_per_s, round_index) for condition in order
                ]
            # The contrast, once: polling slows the load so much that one run says it.
            measurements.append(_measured(rig, "polling", parked, parts, idle_per_s, plan.rounds))
            return measurements
        except BaseException:
            stack.print_log_tails()
            raise
        finally:
            stack.stop()


# --- the report


def _unit(plan: Plan) -> str:
    return "jobs/s" if plan.model == "fraud" else "films/s"


def _percents(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}%" for name, value in cpu.items())


def _label(plan: Plan, condition: str) -> str:
    return {
        "alone": "alone",
        "long-poll": f"{plan.waiters} clients long-polling",
        "polling": f"{plan.waiters} clients polling every {plan.poll_s:g} s",
    }[condition]


def _median_by_part(figures: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(f.get(name, 0.0) for f in figures) for name in figures[0]}


def print_report(plan: Plan, measurements: list[Measurement]) -> None:
    parked = "fraud" if plan.model == "chest-xray" else "chest-xray"
    by_condition = {c: [m for m in measurements if m.condition == c] for c in CONDITIONS}
    alone = statistics.median(m.per_s for m in by_condition["alone"])
    parts = ("API", "workers", "Redis", "clients", "waiters")
    print(
        f"\n{plan.model}: {plan.clients} clients, median of {plan.rounds} round(s); {plan.waiters} waiters, each on a"
        f" queued {parked} job of its own"
    )
    print(
        f"  {'condition':<34} {_unit(plan):>9} {'/ alone':>8}   CPU ms per job: " + " ".join(f"{p:>8}" for p in parts)
    )
    for condition, runs in by_condition.items():
        per_s = statistics.median(m.per_s for m in runs)
        cpu = _median_by_part([m.cpu_ms for m in runs])
        cells = " ".join(f"{cpu[p]:8.2f}" if p in cpu else f"{'-':>8}" for p in parts)
        print(f"  {_label(plan, condition):<34} {per_s:9.1f} {per_s / alone:8.2f}   {' ' * 16}{cells}")
    print("  while only the waiters are there (no load): Redis commands/s beyond the idle stack's; CPU, % of one core")
    for condition, runs in by_condition.items():
        quiets = [m.quiet for m in runs if m.quiet is not None]
        if quiets:
            commands = statistics.median(q.commands_per_s for q in quiets)
            cpu = _median_by_part([q.cpu_percent for q in quiets])
            print(f"  {_label(plan, condition):<34} {commands:9.0f}   {_percents(cpu)}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("fraud", "chest-xray"), default="fraud")
    parser.add_argument("--waiters", type=int, default=None, help="waiting clients (default 1,000; --quick 100)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of alone and long-poll, in turns of order (default 5)"
    )
    parser.add_argument("--poll-s", type=float, default=1.0, help="the polling clients' interval")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 waiters, one round, fewer jobs")
    parser.add_argument("--waiters-child", help=argparse.SUPPRESS)
    return parser.parse_args()


def _plan(args: argparse.Namespace) -> Plan:
    jobs = {"fraud": 2000, "chest-xray": 160}[args.model]
    return Plan(
        model=args.model,
        waiters=args.waiters or (100 if args.quick else 1000),
        rounds=args.rounds or (1 if args.quick else 5),
        clients=16,
        jobs=jobs // 10 if args.quick else jobs,
        quiet_s=2.0 if args.quick else 5.0,
        poll_s=args.poll_s,
    )


def _allow_open_files(needed: int) -> None:
    """Each waiter holds a socket in its process and one in the API's (a child: it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(f"bench_waiting: {needed} open files needed, the hard limit allows {soft}")


def main() -> None:
    args = _parse_args()
    if args.waiters_child:
        _waiters_child(args.waiters_child)
        return
    began = time.monotonic()
    plan = _plan(args)
    _allow_open_files(plan.waiters + 1024)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"inferq waiting benchmark, {now}: {usable_cpus()} usable CPU(s); {plan}")
    measurements = run(plan)
    print_report(plan, measurements)
    print(f"bench_waiting took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
