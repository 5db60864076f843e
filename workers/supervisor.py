"""`inferq worker`: one Celery worker node per usable CPU (or per GPU), kept running.

Each node is a plain `celery -A inferq.workers.app worker` process with its own name, a threads pool sized to the
jobs it may batch, and its own torch thread count; the supervisor starts them, starts again any that dies (the jobs
it held run again once their leases lapse), and on SIGTERM or SIGINT lets every node finish or hand back what it
holds.
This is process management, as `celery multi` or a service manager does it; the broker still hands out the work.

Metrics: the nodes run prometheus-client in multiprocess mode, writing to a folder the supervisor makes fresh for
this run and removes on exit; the supervisor serves their sum on `worker_metrics_port`. A node that dies leaves
its counters and histograms behind (they stay in the sum) and only its gauges are dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from os import EX_CONFIG
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

log = logging.getLogger(__name__)

_POLL_S = 0.5
_QUICK_DEATH_S = 10.0
_MAX_RESTART_DELAY_S = 30.0
_STOP_TIMEOUT_S = 120.0
# prometheus-client reads this variable (in the nodes only) to choose its multiprocess mode.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# libgomp (torch's OpenMP on Linux) keeps the threads of a finished parallel region spinning for 300,000 turns
# before they sleep: several ms here after every multi-threaded pass, a core taken from the API, the node's own
# next steps and a neighbour's pass (measured: a two-thread pass started right after another process's took 59 ms
# instead of 51). 10,000 turns cost a steady pass nothing measurable and cut the delivery of the next job at low
# load by 0.6-0.9 ms (scripts/profile_job.py --model chest-xray, four alternating pairs). A user's own
# GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept.
_OPENMP_SPIN_ENV = {"GOMP_SPINCOUNT": "10000"}
_OPENMP_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


@dataclass(frozen=True)
class NodeSpec:
    """One worker node: its name, command line and environment."""

    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class _Node:
    spec: NodeSpec
    process: subprocess.Popen[bytes]
    started_s: float
    quick_deaths: int = 0


class NodeMetrics:
    """The multiprocess folder of one supervisor's nodes, and the HTTP server that sums it (port 0: no server)."""

    def __init__(self, *, host: str, port: int) -> None:
        self.folder = tempfile.mkdtemp(prefix="inferq-metrics-")
        self._host = host
        self._port = port
        self._server: object | None = None

    def serve(self) -> None:
        if not self._port:
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.folder)
        try:
            self._server, _ = start_http_server(self._port, addr=self._host, registry=registry)
        except OSError as e:  # metrics are worth a warning, never the workers
            print(f"inferq worker: metrics not served on {self._host}:{self._port} ({e})", file=sys.stderr, flush=True)

    def node_died(self, pid: int) -> None:
        multiprocess.mark_process_dead(pid, self.folder)

    def close(self) -> None:
        shutdown = getattr(self._server, "shutdown", None)
        if shutdown is not None:
            shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)


class Supervisor:
    """Runs the nodes until told to stop; `run` returns the exit status."""

    def __init__(self, nodes: list[NodeSpec], *, metrics_host: str = "127.0.0.1", metrics_port: int = 0) -> None:
        self._specs = nodes
        self._nodes: list[_Node] = []
        self._stopping = False
        self._metrics_host = metrics_host
        self._metrics_port = metrics_port
        self._metrics: NodeMetrics | None = None

    def run(self) -> int:
        self._metrics = NodeMetrics(host=self._metrics_host, port=self._metrics_port)
        try:
            self._metrics.serve()
            return self._run()
        finally:
            self._metrics.close()

    def _run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        self._nodes = [self._start(spec) for spec in self._specs]
        while not self._stopping:
            time.sleep(_POLL_S)
            for index, node in enumerate(self._nodes):
                status = node.process.poll()
                if status is None or self._stopping:
                    continue
                if status == EX_CONFIG:
                    # The node refused to start (no GPU, bad weights): starting it again cannot help.
                    self._stop_all()
                    return EX_CONFIG
                self._nodes[index] = self._restart(node, status)
        return self._stop_all()

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, spec: NodeSpec) -> _Node:
        env = {**spec.env, MULTIPROC_DIR_ENV: self._metrics.folder} if self._metrics else spec.env
        process = subprocess.Popen(spec.argv, env=env, stdin=subprocess.DEVNULL)
        return _Node(spec, process, time.monotonic())

    def _restart(self, node: _Node, status: int) -> _Node:
        if self._metrics is not None:
            self._metrics.node_died(node.process.pid)
        quick = time.monotonic() - node.started_s < _QUICK_DEATH_S
        deaths = node.quick_deaths + 1 if quick else 0
        delay_s = min(_MAX_RESTART_DELAY_S, 2.0**deaths - 1)
        print(f"inferq worker: node {node.spec.name} exited ({status}); starting it again", file=sys.stderr, flush=True)
        time.sleep(delay_s)
        restarted = self._start(node.spec)
        restarted.quick_deaths = deaths
        return restarted

    def _stop_all(self) -> int:
        for node in self._nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline_s = time.monotonic() + _STOP_TIMEOUT_S
        worst = 0
        for node in self._nodes:
            try:
                status = node.process.wait(timeout=max(0.1, deadline_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                status = node.process.wait()
            worst = worst or (status if status > 0 else 0)
            if self._metrics is not None:
                self._metrics.node_died(node.process.pid)
        return worst


def celery_worker_argv(queues: list[str], name: str, *, slots: int, loglevel: str) -> list[str]:
    """A plain `celery worker` node of inferq's worker app, as a Celery user starts one."""
    argv = [sys.executable, "-m", "celery", "-A", "inferq.workers.app", "worker", "-Q", ",".join(queues), "-n", name]
    return [*argv, "-P", "threads", "-c", str(slots), "-l", loglevel, "--without-mingle", "--without-gossip"]


def node_specs(
    *,
    pool: str,
    queues: list[str],
    processes: int,
    torch_threads: int,
    slots: int,
    loglevel: str,
    gpus: list[str] | None = None,
    core_share: Path | None = None,
) -> list[NodeSpec]:
    """The nodes of one `inferq worker`: a CPU node per process, or a GPU node per device; CPU nodes lend each other
    idle cores through `core_share` (workers.core_share) where one is given."""
    specs = []
    devices = gpus or [None] * processes  # type: ignore[list-item]
    for index, device in enumerate(devices):
        name = f"inferq-{pool}-{index}-{os.getpid()}@%h"
        argv = celery_worker_argv(queues, name, slots=slots, loglevel=loglevel)
        env = {
            **_openmp_defaults(),
            **os.environ,
            "INFERQ_DEVICE": "cuda" if pool == "gpu" else "cpu",
            "INFERQ_TORCH_THREADS": str(torch_threads),
            "INFERQ_WORKER_PROCESSES": str(len(devices)),
        }
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if core_share is not None:
            env.update({"INFERQ_CORE_SHARE_DIR": str(core_share), "INFERQ_NODE_INDEX": str(index)})
        specs.append(NodeSpec(name, argv, env))
    return specs


def _openmp_defaults() -> dict[str, str]:
    """The nodes' OpenMP wait settings, unless the user chose their own."""
    if any(name in os.environ for name in _OPENMP_WAIT_VARIABLES):
        return {}
    return dict(_OPENMP_SPIN_ENV)
