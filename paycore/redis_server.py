"""A redis-server child process on loopback, for the local stack, the tests and
the benchmark when they run the Redis store (PAYCORE_STORE=redis://...)."""
from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# redis-server cannot take port 0 and say which port it got: it is given a
# port that was free a moment ago, and another if something took it first.
PORT_ATTEMPTS = 5


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serving_pid(port: int) -> int | None:
    """The process id of the redis-server answering on port once its data is
    loaded; None while nothing does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"INFO\r\n")
            reply = connection.makefile("rb")
            header = reply.readline()
            if not header.startswith(b"$"):
                return None
            info = reply.read(int(header[1:]))
    except (OSError, ValueError):
        return None
    pid = re.search(rb"^process_id:(\d+)", info, re.MULTILINE)
    loading = re.search(rb"^loading:1", info, re.MULTILINE)
    return int(pid[1]) if pid and not loading else None


class RedisServer:
    """`durable`: append-only file fsynced every second, as a deployment would
    run it; otherwise nothing is written to disk (tests). Without a port it
    finds one at its first start and keeps it for later starts."""

    def __init__(self, directory: Path, durable: bool = True) -> None:
        self.directory = directory
        self.durable = durable
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (make test / make run install it)")
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.durable
                       else ["--appendonly", "no"])
        return [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning",
                *persistence]

    def start(self, spawn=subprocess.Popen) -> RedisServer:
        """`spawn(command)` starts the process (the stack's spawn puts it in its cgroups)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        choose_port = self.port is None
        for _ in range(PORT_ATTEMPTS if choose_port else 1):
            if choose_port:
                self.port = _unused_port()
            self.process = spawn(self.command())
            if self._serving():
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start (last on port {self.port})")

    def _serving(self) -> bool:
        """Until this process answers on the port, loaded; False if it exits first."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while _serving_pid(self.port) != self.process.pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
