"""Fixtures that run the real topology on loopback: emulated processors,
two service instances, the load balancer in front."""
from __future__ import annotations

import http.client
import json
import os
import pathlib
import random
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import settings


from paycore.stack import Stack, StackSettings

ADMIN_TOKEN = "123"

# Random test data comes from test_random, seeded again before each test from
# PAYCORE_TEST_SEED and the test's id: the same data on every run, other data
# in each test; a failing test's report says how to get its data again.
TEST_SEED = os.environ.get("PAYCORE_TEST_SEED", "2025")
test_random = random.Random()
settings.register_profile("seeded", derandomize=True)
settings.load_profile("seeded")


def pytest_report_header() -> str:
    return f"random test data: PAYCORE_TEST_SEED={TEST_SEED}"


@pytest.fixture(autouse=True)
def _seed_test_data(request) -> None:
    test_random.seed(f"{TEST_SEED}:{request.node.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("random test data",
                                f"PAYCORE_TEST_SEED={TEST_SEED}, seeded again for {item.nodeid}"))


@pytest.fixture
def memory_path(tmp_path):
    """Like tmp_path, on tmpfs: where a journal is written on the event loop."""
    path = tempfile.mkdtemp(prefix=f"paycore-test-{os.getpid()}-", dir="/dev/shm")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def random_uuid() -> uuid.UUID:
    return uuid.UUID(int=test_random.getrandbits(128), version=4)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    """Until condition() holds: an assertion fails once timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def call(connection: http.client.HTTPConnection, method: str, path: str,
         body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    raw = response.read()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw


class Processor:
    """Admin and lookup calls to one emulated processor."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=10)

    def admin(self, method: str, path: str, payload: dict | None = None) -> tuple[int, Any]:
        body = json.dumps(payload).encode() if payload is not None else None
        return call(self.connection, method, path, body,
                    {"X-Rinha-Token": ADMIN_TOKEN, "Content-Type": "application/json"})

    def set_delay(self, ms: int) -> None:
        assert self.admin("PUT", "/admin/configurations/delay", {"delay": ms})[0] == 200

    def set_failure(self, failing: bool) -> None:
        assert self.admin("PUT", "/admin/configurations/failure", {"failure": failing})[0] == 200

    def summary(self, query: str = "") -> dict:
        status, body = self.admin("GET", "/admin/payments-summary" + query)
        assert status == 200
        return body

    def held(self, correlation_id: str) -> dict | None:
        status, body = call(self.connection, "GET", f"/payments/{correlation_id}")
        assert status in (200, 404)
        return body if status == 200 else None

    def reset(self) -> None:
        self.set_failure(False)
        self.set_delay(0)
        assert self.admin("POST", "/admin/purge-payments")[0] == 200


class RunningStack:
    def __init__(self, stack: Stack, admin_urls: tuple[str, str] | None = None) -> None:
        """admin_urls: where the processors' admin and lookup calls go, when the
        instances reach the processors some other way (through a fault proxy)."""
        self.stack = stack
        self.port = stack.port
        default_url, fallback_url = admin_urls or (stack.default_url, stack.fallback_url)
        self.default = Processor(default_url)
        self.fallback = Processor(fallback_url)

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def instance(self, index: int) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.stack.socket_path(index))

    def summaries(self, query: str = "") -> list[dict]:
        """The summary as each instance answers it, asked directly, not through the load balancer."""
        return [call(self.instance(index), "GET", "/payments-summary" + query)[1]
                for index in sorted(self.stack.instances)]

    def set_both_failing(self, failing: bool) -> None:
        self.default.set_failure(failing)
        self.fallback.set_failure(failing)

    def processors_summary(self, query: str = "") -> dict:
        return {"default": self.default.summary(query), "fallback": self.fallback.summary(query)}

    @property
    def admin_headers(self) -> dict[str, str]:
        """What POST /purge-payments needs: the stack's admin token."""
        return {"Authorization": f"Bearer {self.stack.settings.admin_token}"}

    def reset(self) -> None:
        self.default.reset()
        self.fallback.reset()
        assert call(self.client(), "POST", "/purge-payments", headers=self.admin_headers)[0] == 200

    def wait_until_processed(self, expected: int, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            processed = self.processors_summary()
            total = processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"]
            if total >= expected or time.monotonic() > deadline:
                return processed
            time.sleep(0.1)


# A short health window keeps fault tests quick; the schedule logic is the same.
TEST_EMULATOR_ARGS = ("--health-interval", "0.5")
TEST_INSTANCE_ENV = {"PAYCORE_HEALTH_INTERVAL_MS": "550", "PAYCORE_RETRY_MAX_MS": "300",
                     "PAYCORE_LOG_LEVEL": "WARNING"}


@contextmanager
def quick_stack(processor_urls: tuple[str, str] | None = None,
                admin_urls: tuple[str, str] | None = None, store: str = "embedded",
                instances: int = 2, **instance_env: str):
    """The real topology on ports the OS picks, tuned for tests. instance_env adds to or
    overrides the instances' environment. processor_urls: processors the caller
    runs (emulators are started otherwise), with admin_urls to reach them directly.
    store and instances: as in StackSettings."""
    default_url, fallback_url = processor_urls or (None, None)
    settings = StackSettings(
        port=0, default_port=0, fallback_port=0, quiet=True,
        default_url=default_url, fallback_url=fallback_url, emulator_args=TEST_EMULATOR_ARGS,
        instance_env={**TEST_INSTANCE_ENV, **instance_env}, store=store, instances=instances,
    )
    with Stack(settings) as stack:
        running = RunningStack(stack, admin_urls)
        running.reset()
        yield running


@pytest.fixture(scope="session")
def running_stack():
    with quick_stack(PAYCORE_RETRY_MAX_MS="500") as running:
        yield running


@pytest.fixture
def live(running_stack: RunningStack) -> RunningStack:
    running_stack.reset()
    yield running_stack
    running_stack.reset()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session (tests/redis_server.py)."""
    from redis_server import ScratchRedis
    with ScratchRedis(str(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for each test."""
    assert redis_server.call("FLUSHDB").startswith(b"+OK")
    return redis_server.url
