"""The tests' redis-server: paycore.redis_server's on loopback and a port of its own,
persisting nothing, plus what tests do to it: crash it, send it a command from
outside, listen on a unix socket too."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Self

import hiredis

from paycore.redis_server import RedisServer


class ScratchRedis(RedisServer):
    """start() again after kill() keeps the port and socket, as a restarted
    server would. A context manager: started on entry, stopped on exit."""

    def __init__(self, directory: str, unix_socket: bool = False) -> None:
        super().__init__(Path(directory), durable=False)
        self.socket_path = str(self.directory / "redis.sock") if unix_socket else None

    def command(self) -> list[str]:
        line = super().command()
        return line if self.socket_path is None else [*line, "--unixsocket", self.socket_path]

    def kill(self) -> None:
        """As a crash: no goodbye to its clients."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def call(self, *args: str) -> bytes:
        """One command on a connection of its own; its raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(hiredis.pack_command(args))
            return connection.recv(65536)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
