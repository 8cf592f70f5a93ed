"""A redis-server child process on loopback, for the local stack, the tests and
the benchmark when they run the Redis store (PAYCORE_STORE=redis://...)."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`durable`: append-only file fsynced every second, as a deployment would
    run it; otherwise nothing is written to disk (tests)."""

    def __init__(self, directory: Path, port: int, durable: bool = True) -> None:
        self.directory = directory
        self.port = port
        self.durable = durable
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
        self.process = spawn(self.command())
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

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
