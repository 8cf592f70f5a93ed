"""SPEC §4 around the load: the processors' fault schedule, the consistency
checker every 10 s, and the processors' admin summaries."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from paycore.core.timestamp import format_timestamp

ADMIN_TOKEN = "123"
FULL_RUN_S = 300
CHECK_INTERVAL_S = 10
# Linux's SO_TIMESTAMPNS (also the type of its control message): the kernel stamps each
# received segment with its arrival time on the realtime clock, as for the generator's
# POST /payments. That clock can be stepped, so it only measures how long received
# bytes waited to be read; a call's duration is on the monotonic clock.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
# (second of the full run, (default delay ms, failing), (fallback delay ms, failing))
FAULT_SCHEDULE = [
    (1, (0, False), (0, False)),
    (30, (1000, False), (0, False)),
    (60, (500, False), (0, False)),
    (90, (2000, True), (1000, False)),
    (120, (5000, True), (5, False)),
    (150, (0, False), (5, True)),
    (180, (100, False), (5, False)),
    (210, (50, False), (0, False)),
    (240, (103, False), (10, False)),
    (270, (2000, False), (0, False)),
]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class HttpJson:
    """One keep-alive connection over a plain socket; each call returns (status,
    parsed body, seconds from the request's send to the arrival of its last
    byte, by the kernel's receive timestamp where there is one). Kept this
    thin so the times it reports are the server's, not an HTTP library's or
    this thread's wake-up."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, parse_float=float) -> None:
        """parse_float: what JSON numbers with a fraction become (Decimal: exact amounts)."""
        host, port = url.removeprefix("http://").split(":")
        self._address = (host, int(port))
        self._parse_float = parse_float
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._socket: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._socket is None:
            self._socket = socket.create_connection(self._address, timeout=10)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return self._socket

    def call(self, method: str, path: str, payload: dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, object, float]:
        body = json.dumps(payload).encode() if payload is not None else b""
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = (f"{method} {path} HTTP/1.1\r\nHost: {self._address[0]}\r\n{self._headers}{extra}"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        for attempt in (1, 2):
            try:
                connection = self._connect()
                sent_ns = time.monotonic_ns()
                connection.sendall(request)
                status, raw, arrived_ns = self._read_response(connection)
                elapsed = ((arrived_ns or time.monotonic_ns()) - sent_ns) / 1e9
                return status, (json.loads(raw, parse_float=self._parse_float) if raw else None), elapsed
            except (OSError, ValueError):
                if self._socket is not None:
                    self._socket.close()
                self._socket = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _read_response(connection: socket.socket) -> tuple[int, bytes, int | None]:
        """(status, body, arrival of the last bytes on the monotonic clock in ns,
        or None if the kernel did not stamp them)."""
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk, arrived_ns = _receive(connection)
            if not chunk:
                raise ConnectionError("connection closed mid-response")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk, arrived_ns = _receive(connection)
            if not chunk:
                raise ConnectionError("connection closed mid-body")
            body += chunk
        return status, body, arrived_ns


def _receive(connection: socket.socket) -> tuple[bytes, int | None]:
    chunk, control, _, _ = connection.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
    read_ns, read_real_ns = time.monotonic_ns(), time.time_ns()
    for level, kind, data in control:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            waited_ns = read_real_ns - (seconds * 1_000_000_000 + nanoseconds)
            # A stamp after the read: the realtime clock was stepped in between.
            return chunk, (read_ns - waited_ns if waited_ns >= 0 else None)
    return chunk, None


def range_query(from_ms: int | None, to_ms: int | None) -> str:
    parts = []
    if from_ms is not None:
        parts.append(f"from={format_timestamp(from_ms)}")
    if to_ms is not None:
        parts.append(f"to={format_timestamp(to_ms)}")
    return "?" + "&".join(parts) if parts else ""


class Processors:
    """Admin calls to both processors; one object per thread (its connections are its own)."""

    def __init__(self, default_url: str, fallback_url: str, parse_float=float) -> None:
        self.urls = (default_url, fallback_url)
        self.admin = {name: HttpJson(url, {"X-Rinha-Token": ADMIN_TOKEN}, parse_float)
                      for name, url in zip(("default", "fallback"), self.urls)}

    def configure(self, name: str, delay_ms: int, failing: bool) -> None:
        self.admin[name].call("PUT", "/admin/configurations/delay", {"delay": delay_ms})
        self.admin[name].call("PUT", "/admin/configurations/failure", {"failure": failing})

    def summary(self, from_ms: int | None = None, to_ms: int | None = None) -> dict[str, dict]:
        query = range_query(from_ms, to_ms)
        return {name: admin.call("GET", "/admin/payments-summary" + query)[1]
                for name, admin in self.admin.items()}

    def purge(self) -> None:
        for admin in self.admin.values():
            admin.call("POST", "/admin/purge-payments")


@dataclass
class Stage:
    started_ms: int
    default: tuple[int, bool]
    fallback: tuple[int, bool]
    ended_ms: int | None = None


@dataclass
class ScenarioLog:
    stages: list[Stage] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    service_call_seconds: dict[str, list[float]] = field(default_factory=lambda: {"summary": [], "purge": []})


class Scenario:
    """Runs the fault schedule and the checker in threads while the load runs."""

    def __init__(self, processors: Processors, service_url: str, seconds: float, admin_token: str) -> None:
        """admin_token: the service's PAYCORE_ADMIN_TOKEN, for its purge."""
        self._processors = processors
        self._admin_headers = {"Authorization": f"Bearer {admin_token}"}
        self._checked_processors = Processors(*processors.urls)
        self._service = HttpJson(service_url)
        self._seconds = seconds
        self._scale = seconds / FULL_RUN_S
        self._stop = threading.Event()
        self.log = ScenarioLog()
        self._threads = [threading.Thread(target=self._apply_faults, daemon=True),
                         threading.Thread(target=self._check, daemon=True)]

    def service_summary(self) -> dict:
        """The service's unbounded summary (after stop(): the checker owns the connection till then)."""
        return self._service.call("GET", "/payments-summary")[1]

    def purge_service(self) -> None:
        status, _, elapsed = self._service.call("POST", "/purge-payments", headers=self._admin_headers)
        assert status == 200, status
        self.log.service_call_seconds["purge"].append(elapsed)

    def start(self, started_at: float) -> None:
        self._started_at = started_at
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self.log.stages:
            self.log.stages[-1].ended_ms = now_ms()

    def _wait_until(self, second: float) -> bool:
        return not self._stop.wait(max(0.0, self._started_at + second - time.monotonic()))

    def _apply_faults(self) -> None:
        for second, default, fallback in FAULT_SCHEDULE:
            if not self._wait_until(second * self._scale):
                return
            self._processors.configure("default", *default)
            self._processors.configure("fallback", *fallback)
            stage = Stage(now_ms(), default, fallback)
            if self.log.stages:
                self.log.stages[-1].ended_ms = stage.started_ms
            self.log.stages.append(stage)

    def _check(self) -> None:
        """As the challenge's checker runs in k6 (one VU of a constant-vus scenario
        as long as the load): check, sleep 10 s, again; the first check as the
        load starts, none begun once it is over."""
        second = 0.0
        while second < self._seconds and self._wait_until(second):
            at = now_ms()
            from_ms, to_ms = at - 15_000, at - 2_000
            status, ours, elapsed = self._service.call("GET", "/payments-summary" + range_query(from_ms, to_ms))
            self.log.service_call_seconds["summary"].append(elapsed)
            theirs = self._checked_processors.summary(from_ms, to_ms)
            difference = sum(abs(ours[name]["totalRequests"] - theirs[name]["totalRequests"])
                             for name in ("default", "fallback")) if status == 200 else None
            self.log.checks.append({"at_ms": at, "status": status, "inconsistencies": difference,
                                    "elapsed_ms": round(elapsed * 1000, 3),
                                    "service": ours, "processors": {
                                        name: {"totalRequests": report["totalRequests"],
                                               "totalAmount": report["totalAmount"]}
                                        for name, report in theirs.items()}})
            second = time.monotonic() - self._started_at + CHECK_INTERVAL_S
