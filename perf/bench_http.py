"""The HTTP layer's request path, this checkout against another revision, side by side.

One HttpProtocol per revision, each fed the load generator's POST /payments one
request per read, as a keep-alive client sends them; the handler answers 202
at once and, like the journal, holds the answer until the end of the read.
What is timed is the HTTP layer alone: parsing, the callbacks, ordering and
writing the answer. The other revision's service/ is taken from git into a
temporary package, so both run in one process, interleaved, on the same noise.

Run: .venv/bin/python perf/bench_http.py [--against REV]   (REV: main by default;
HTTP_BENCH_ROUNDS requests per timing, 100,000 by default)
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BODY = b'{"correlationId":"4a7901b8-7d26-4d5d-aa7a-3d2b1b1d9f2c","amount":20.05}'
REQUEST = (b"POST /payments HTTP/1.1\r\nHost: localhost:9999\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
ROUNDS = int(os.environ.get("HTTP_BENCH_ROUNDS", "100000"))
REPEATS = 5


class Transport(asyncio.Transport):
    """Takes every write, as a socket with room does."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection is kept alive")

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        raise AssertionError("nothing to pause for")

    def resume_reading(self) -> None:
        pass


class Journal:
    """An accepted payment's answer waits for the end of the read, as with the
    journal (http_server.Durability)."""

    promised = 0

    def __init__(self) -> None:
        self._waiting: list = []

    def after_durable(self, promise: int, callback, *args) -> None:
        self._waiting.append((callback, args))

    def flush_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for callback, args in waiting:
            callback(*args)


def load_service(revision: str, into: Path):
    """The service package of revision, importable as its own top-level package."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "service"],
                             check=True, capture_output=True).stdout
    package = into / f"service_{revision.replace('/', '_').replace('~', '_')}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "service").rename(package)
    sys.path.insert(0, str(into))
    return package.name


def protocol_for(package: str):
    http_server = importlib.import_module(f"{package}.http_server")
    responses = importlib.import_module(f"{package}.responses")
    connections = importlib.import_module(f"{package}.connections")
    metrics = importlib.import_module(f"{package}.metrics")

    class Routes:
        def handle(self, method: bytes, url: bytes, body: bytes, *rest: bytes) -> bytes:
            return responses.ACCEPTED

    guard = connections.ConnectionGuard(connections.ConnectionLimits(16, 8192, 16384, 5000, 75000))
    protocol = http_server.HttpProtocol(Routes(), Journal(), guard, metrics.Metrics())
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    assert transport.written == 1, "the request was not answered"
    return protocol


def per_request_ns(protocol) -> list[float]:
    feed = protocol.data_received
    return [seconds / ROUNDS * 1e9
            for seconds in timeit.repeat(lambda: feed(REQUEST), number=ROUNDS, repeat=REPEATS)]


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--against", default="main", help="git revision to compare with")
    against = arguments.parse_args().against
    with tempfile.TemporaryDirectory() as scratch:
        protocols = {"this checkout": protocol_for("paycore.service"),
                     against: protocol_for(load_service(against, Path(scratch)))}
        results: dict[str, list[float]] = {name: [] for name in protocols}
        for _ in range(3):  # interleaved
            for name, protocol in protocols.items():
                results[name] += per_request_ns(protocol)
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, median in medians.items():
        print(f"{name:>16}: median {median:6.0f} ns per request ({len(results[name])} runs of {ROUNDS:,})")
    print(f"{'ratio':>16}: this checkout takes {medians['this checkout'] / medians[against]:.3f}x {against}'s time")


if __name__ == "__main__":
    main()
