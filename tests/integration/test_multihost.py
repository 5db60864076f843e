"""Workers on other hosts: three network namespaces stand in for three machines. Redis and the API run on one,
a worker on each of the other two; the workers know nothing but the broker's address. One worker host loses its
network in the middle of a run, and every job still ends: the other host takes the queue, and the jobs the lost
host held are recovered once it is gone."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferq.config import Settings
from inferq.producers.client import FINAL_STATUSES, InferqClient
from inferq.producers.redis_server import find_redis_server
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from tests.integration.netns import NamespacesRefused, NetworkLab

pytestmark = pytest.mark.slow

_REDIS_PORT = 6379  # each namespace has its own ports, so the usual ones are free
_API_PORT = 8000
_READY_TIMEOUT_S = 180.0
_JOB_TIMEOUT_S = 300.0
_RECOVERY_TIMEOUT_S = 240.0
# The broker listens beyond loopback here (other hosts reach it), so it takes a password, as a real one would.
_REDIS_PASSWORD = secrets.token_urlsafe(18)


@dataclass
class Hosts:
    lab: NetworkLab
    api_url: str
    stacks: dict[str, ServiceStack]
    samples: list[Path]
    api_key: str = ""

    def worker_log(self, host: str) -> str:
        return self.stacks[host].log_of("worker")


def _base_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "INFERQ_MODELS_DIR": str(Settings().models_dir),
        "INFERQ_TORCH_THREADS": "1",
        "INFERQ_DATA_DIR": str(tmp),
        # Short leases and lost-message checks, so that a lost host's jobs come back within seconds here.
        "INFERQ_LEASE_S": "5",
        "INFERQ_LOST_MESSAGE_CHECK_S": "5",
    }


def _start_core(lab: NetworkLab, tmp: Path) -> ServiceStack:
    env = {**_base_env(tmp), "INFERQ_REDIS_URL": f"redis://:{_REDIS_PASSWORD}@127.0.0.1:{_REDIS_PORT}/0"}
    core = ServiceStack(env, tmp / "core")
    (tmp / "redis").mkdir()
    conf = tmp / "redis" / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(f"requirepass {_REDIS_PASSWORD}\n")
    redis_argv = [find_redis_server(), str(conf), "--port", str(_REDIS_PORT), "--bind", "0.0.0.0",
                  "--save", "", "--dir", str(tmp / "redis")]  # fmt: skip
    core.start_command("redis", lab.exec_argv(lab.core, redis_argv))
    api_argv = [sys.executable, "-m", "inferq.producers.cli", "api", "--host", "0.0.0.0", "--port", str(_API_PORT)]
    core.start_command("api", lab.exec_argv(lab.core, api_argv))
    # A deployment runs its reconciler next to the broker: it re-runs what a lost host held.
    reconciler_argv = [sys.executable, "-m", "inferq.producers.cli", "reconciler"]
    core.start_command("reconciler", lab.exec_argv(lab.core, reconciler_argv))
    return core


def _start_worker(lab: NetworkLab, host: str, tmp: Path) -> ServiceStack:
    # The only thing a worker host is told: where the broker is, as that host sees it.
    broker = f"redis://:{_REDIS_PASSWORD}@{lab.core_address_for(host)}:{_REDIS_PORT}/0"
    stack = ServiceStack({**_base_env(tmp), "INFERQ_REDIS_URL": broker}, tmp / host)
    argv = [sys.executable, "-m", "inferq.producers.cli", "worker", "--pool", "cpu", "--models", "chest-xray",
            "--concurrency", "1"]  # fmt: skip
    stack.start_command("worker", lab.exec_argv(host, argv))
    return stack


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    tmp = tmp_path_factory.mktemp("multihost")
    lab = NetworkLab()
    stacks: dict[str, ServiceStack] = {}
    try:
        try:
            lab.build(worker_hosts=2)
        except NamespacesRefused as e:
            pytest.skip(f"the kernel refuses network namespaces here (needs root or CAP_NET_ADMIN): {e}")
        stacks[lab.core] = _start_core(lab, tmp)
        for index in (1, 2):
            stacks[lab.host(index)] = _start_worker(lab, lab.host(index), tmp)
        core_address = lab.core_address_for("root")
        hosts = Hosts(
            lab=lab,
            api_url=f"http://{core_address}:{_API_PORT}",
            stacks=stacks,
            samples=write_samples(tmp / "samples"),
        )
        stacks[lab.core].wait_http(f"{hosts.api_url}/healthz", timeout_s=_READY_TIMEOUT_S)
        hosts.api_key = _create_key(lab, stacks[lab.core])
        for index in (1, 2):
            _wait_for_log(stacks[lab.host(index)], "worker", re.compile(r"\bready\."), _READY_TIMEOUT_S)
        yield hosts
    finally:
        for stack in stacks.values():
            stack.stop()
        lab.remove()


def _wait_for_log(stack: ServiceStack, name: str, pattern: re.Pattern[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pattern.search(stack.log_of(name)):
            return
        assert name not in stack.dead(), stack.log_of(name)[-4000:]
        time.sleep(0.05)
    raise AssertionError(f"{name} never logged {pattern.pattern!r}:\n{stack.log_of(name)[-4000:]}")


def _create_key(lab: NetworkLab, core: ServiceStack) -> str:
    """An API key made on the core host, as an operator there would: `inferq keys create`, last line."""
    argv = [
        sys.executable,
        "-m",
        "inferq.producers.cli",
        "keys",
        "create",
        "--tenant",
        "hosts",
        "--roles",
        "submit,read",
    ]
    done = subprocess.run(lab.exec_argv(lab.core, argv), env=core.env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def _submit(hosts: Hosts, count: int) -> list[str]:
    with InferqClient(hosts.api_url, api_key=hosts.api_key) as client:
        return [client.submit("chest-xray", hosts.samples[i % len(hosts.samples)]) for i in range(count)]


def _statuses(hosts: Hosts, job_ids: list[str]) -> dict[str, str]:
    with InferqClient(hosts.api_url, api_key=hosts.api_key) as client:
        return {job_id: client.status(job_id)["status"] for job_id in job_ids}


def _wait_final(hosts: Hosts, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Poll until every job is final or `timeout_s` passed; the last statuses either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = _statuses(hosts, job_ids)
        if all(s in FINAL_STATUSES for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)


def _ran_on(hosts: Hosts, host: str, job_ids: list[str]) -> set[str]:
    log = hosts.worker_log(host)
    return {job_id for job_id in job_ids if f"[{job_id}] succeeded" in log}


def test_workers_on_two_hosts_share_the_jobs(hosts: Hosts) -> None:
    lab = hosts.lab
    job_ids = _submit(hosts, 8)
    statuses = _wait_final(hosts, job_ids, _JOB_TIMEOUT_S)
    assert set(statuses.values()) == {"succeeded"}, statuses
    # Both hosts served jobs, and each job ran on exactly one of them.
    first, second = (_ran_on(hosts, lab.host(i), job_ids) for i in (1, 2))
    assert first and second, (first, second)
    assert first | second == set(job_ids) and not first & second


@pytest.mark.timeout(600)
def test_a_worker_host_cut_off_mid_run_loses_no_job(hosts: Hosts) -> None:
    lab = hosts.lab
    lost_host, other_host = lab.host(1), lab.host(2)
    # Given a backlog that both hosts are working through
    job_ids = _submit(hosts, 12)
    # When the first host has taken one of these jobs, its network goes: no packet in or out, no RST
    taken = re.compile("|".join(rf"\[{job_id}\] received" for job_id in job_ids))
    _wait_for_log(hosts.stacks[lost_host], "worker", taken, _JOB_TIMEOUT_S)
    lab.cut(lost_host)
    log = hosts.worker_log(lost_host)
    held = [j for j in job_ids if f"[{j}] received" in log and f"[{j}] succeeded" not in log]
    assert held, held
    # Then every job succeeds: the other host drains the queue, and the jobs the cut host held (claimed, or only
    # received) come back through the reconciler once their leases lapse or their messages count as lost
    try:
        statuses = _wait_final(hosts, job_ids, _RECOVERY_TIMEOUT_S)
        assert set(statuses.values()) == {"succeeded"}, statuses
        assert set(held) <= _ran_on(hosts, other_host, held)
    finally:
        # The cut host is gone for good, as if powered off: a SIGTERM would only wait out Celery's warm shutdown
        # against a broker it cannot reach.
        hosts.stacks[lost_host].kill()
