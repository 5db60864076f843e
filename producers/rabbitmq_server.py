"""A private RabbitMQ for the tests: Debian's `rabbitmq-server` on free loopback ports, with its own node name,
data and log directories, Erlang cookie and port mapper, so it never meets the machine's own RabbitMQ.

The management plugin stays off (no plugins at all): the tests need AMQP only, and it would open another port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from kombu import Connection

from inferq.producers.redis_server import free_port
from inferq.protocol.errors import BackendUnavailable

_START_TIMEOUT_S = 90.0
_SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def find_rabbitmq_server() -> Path | None:
    """The server script that runs as the calling user (Debian's /usr/sbin wrapper switches to `rabbitmq`)."""
    if _SERVER_SCRIPT.is_file():
        return _SERVER_SCRIPT
    found = shutil.which("rabbitmq-server")
    return Path(found) if found else None


class EmbeddedRabbitMQ:
    """A rabbitmq-server subprocess and its own epmd; use as a context manager or call `start`/`stop`."""

    def __init__(self, data_dir: Path, *, binary: Path | None = None) -> None:
        found = binary or find_rabbitmq_server()
        if found is None or shutil.which("epmd") is None:
            raise BackendUnavailable("no rabbitmq-server (and Erlang's epmd) on this machine")
        self.binary = found
        self.data_dir = data_dir
        self.port = free_port()
        self._epmd_port = free_port()
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> str:
        for sub in ("home", "mnesia", "log"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        # Our own port mapper, in the foreground, so stopping it is ours to do and no daemon outlives the tests.
        epmd = ["epmd", "-port", str(self._epmd_port), "-address", "127.0.0.1"]
        self._processes.append(self._spawn(epmd, "epmd.log"))
        self._processes.append(self._spawn([str(self.binary)], "server.log"))
        self._wait_ready()
        return self.url

    def _environment(self) -> dict[str, str]:
        conf = self.data_dir / "rabbitmq.conf"
        conf.write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (self.data_dir / "enabled_plugins").write_text("[].\n")
        # An empty env file keeps the system's rabbitmq-env.conf (fixed node name, fixed port) out.
        (self.data_dir / "rabbitmq-env.conf").write_text("")
        return {
            **os.environ,
            "HOME": str(self.data_dir / "home"),  # a throwaway Erlang cookie is written here
            "RABBITMQ_NODENAME": f"inferq-test-{self.port}@localhost",
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_CONF_ENV_FILE": str(self.data_dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.data_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.data_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.data_dir / "log"),
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false",
        }

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.data_dir / log_name).open("ab") as log:
            return subprocess.Popen(
                argv,
                env=self._environment(),
                cwd=self.data_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in self._processes):
            try:
                with Connection(self.url, connect_timeout=1) as connection:
                    connection.ensure_connection(max_retries=1, timeout=1)
                return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise BackendUnavailable(f"rabbitmq-server did not start on port {self.port}; see {self.data_dir}/server.log")

    def stop(self) -> None:
        # The server first, then its port mapper.
        # Each in its own process group: the server script starts the Erlang VM as a child.
        for process in reversed(self._processes):
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        self._processes.clear()

    def __enter__(self) -> EmbeddedRabbitMQ:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
