"""A single-host stack of inferq services in subprocesses (worker, API, Flower), for the demo and the tests.

Each service runs as `python -m inferq.producers.cli ...` in its own process group, so stopping it also stops the
worker's pool children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from inferq.protocol.errors import BackendUnavailable

_STOP_TIMEOUT_S = 20.0


class ServiceStack:
    """Starts services with a shared environment; `stop` (or leaving the `with`) ends them all."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `inferq ARGS...` as the service `name`."""
        return self.start_command(name, [sys.executable, "-m", "inferq.producers.cli", *args])

    def start_command(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def log_of(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def print_log_tails(self, *, chars: int = 3000) -> None:
        """The end of every started service's log on stderr: what a script that failed shows before it re-raises."""
        for name in self.processes:
            print(f"--- {name} log (tail)\n{self.log_of(name)[-chars:]}", file=sys.stderr)

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def wait_http(self, url: str, *, timeout_s: float) -> None:
        """Wait until `url` answers 200, or raise naming the service logs to read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.dead():
                break
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BackendUnavailable(f"{url} did not become ready (dead: {self.dead()}); logs in {self.log_dir}")

    def stop(self) -> None:
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def kill(self) -> None:
        """End every service at once with SIGKILL, as a host that loses power: no shutdown, nothing handed back."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self.processes.clear()

    def __enter__(self) -> ServiceStack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
