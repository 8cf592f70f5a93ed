"""A slow disk delays only the answers that wait on it (the journal's writer
thread syncs; the event loop goes on serving)."""
from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import UnixHTTPConnection, call, quick_stack

STALL_MS = 1000
SERVED_WITHIN_S = 0.3


@pytest.fixture(scope="module")
def slow_disk(tmp_path_factory) -> Path:
    library = tmp_path_factory.mktemp("slow-disk") / "slow_disk.so"
    source = Path(__file__).with_name("slow_disk.c")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    return library


def payment_body() -> bytes:
    return b'{"correlationId": "%s", "amount": 20.05}' % str(uuid.uuid4()).encode()


def timed(request) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = request()
    return status, time.monotonic() - started


def test_a_stalled_journal_sync_holds_only_the_answers_that_wait_for_it(slow_disk, tmp_path):
    trigger = tmp_path / "stall"
    with quick_stack(LD_PRELOAD=str(slow_disk), SLOW_DISK_TRIGGER=str(trigger),
                     SLOW_DISK_STALL_MS=str(STALL_MS), PAYCORE_JOURNAL_SYNC="1") as live:
        instance = lambda: live.instance(1)  # noqa: E731
        metrics = lambda: UnixHTTPConnection(  # noqa: E731
            str(live.stack.instance_shared_dir(1) / "metrics-1.sock"))
        assert call(instance(), "POST", "/payments", payment_body())[0] == 202

        trigger.touch()
        stalled: list[tuple[int, float]] = []
        post = threading.Thread(target=lambda: stalled.append(
            timed(lambda: call(instance(), "POST", "/payments", payment_body()))))
        post.start()
        deadline = time.monotonic() + 5
        while b"paycore_journal_backlog_records 0" in call(metrics(), "GET", "/metrics")[1]:
            assert time.monotonic() < deadline, "the payment never reached the journal"
            time.sleep(0.01)

        # While the sync is stalled: summaries, lookups, metrics and other
        # connections are served at once.
        requests = {"summary": lambda: call(instance(), "GET", "/payments-summary"),
                    "lookup": lambda: call(instance(), "GET", f"/payments/{uuid.uuid4()}"),
                    "metrics": lambda: call(metrics(), "GET", "/metrics"),
                    "summary through the balancer": lambda: call(live.client(), "GET", "/payments-summary")}
        for name, request in requests.items():
            status, elapsed = timed(request)
            assert status in (200, 404) and elapsed < SERVED_WITHIN_S, (name, status, elapsed)
        assert post.is_alive(), "the payment was answered before its journal batch was synced"
        trigger.unlink()
        post.join(10)
        ((status, elapsed),) = stalled
        assert status == 202 and elapsed >= STALL_MS / 1000 * 0.9
