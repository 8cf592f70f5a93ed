"""A 2xx is a promise that survives the process: instances SIGKILLed and
restarted lose nothing and pay nothing twice; SIGTERM drains, then exits 0."""
from __future__ import annotations

import errno
import http.client
import os
import resource
import select
import signal
import sqlite3
import threading
import time

import pytest

from conftest import RunningStack, UnixHTTPConnection, call, quick_stack, random_uuid, test_random, wait_until
from paycore.service.store.embedded.store import RECORD_FILE
from test_metrics import scrape, value
from test_service import assert_ledgers_catch_up, payment
from test_unknown_outcomes import held_by

LOAD_CLIENTS = 8
LOAD_SECONDS = 12.0
LOAD_MAX_PAYMENTS = 6000
PAUSE_BETWEEN_POSTS_S = 0.015  # ~400 payments/s in all: kills land mid-load


class Load:
    """Clients posting fresh payments through the load balancer, bounded in
    count and time. A request that got no answer may or may not have been
    accepted: it is remembered apart."""

    def __init__(self, live: RunningStack) -> None:
        self._live = live
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.accepted: list[str] = []
        self.unanswered: list[str] = []
        self.refused = 0
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(LOAD_CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _client(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        connection = self._live.client()
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if len(self.accepted) + len(self.unanswered) >= LOAD_MAX_PAYMENTS:
                    return
            correlation_id = str(random_uuid())
            try:
                status, _ = call(connection, "POST", "/payments", payment(correlation_id))
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.unanswered.append(correlation_id)
                connection.close()
                connection = self._live.client()
                continue
            with self._lock:
                if 200 <= status < 300:
                    self.accepted.append(correlation_id)
                else:
                    self.refused += 1
            time.sleep(PAUSE_BETWEEN_POSTS_S)


def wait_until_held(live: RunningStack, correlation_ids: list[str], timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = list(correlation_ids)
    while waiting and time.monotonic() < deadline:
        waiting = [i for i in waiting if not held_by(live, i)]
        if waiting:
            time.sleep(0.3)


def assert_exactly_once(live: RunningStack, accepted: list[str], unanswered: list[str] = ()) -> None:
    """Every accepted payment is held by exactly one processor; a request that got
    no answer by at most one; the processors hold nothing else; the service's
    ledgers agree with them."""
    wait_until_held(live, accepted)
    holders = {i: held_by(live, i) for i in (*accepted, *unanswered)}
    assert [i for i in accepted if len(holders[i]) != 1] == []
    assert [i for i in unanswered if len(holders[i]) > 1] == []
    held = sum(len(names) for names in holders.values())
    processors = live.processors_summary()
    assert processors["default"]["totalRequests"] + processors["fallback"]["totalRequests"] == held
    assert_ledgers_catch_up(live)


def assert_load_paid_exactly_once(live: RunningStack, load: Load) -> None:
    """After kills under load: enough payments went through for the kills to
    matter, and each is paid exactly once once the default is fast again."""
    assert len(load.accepted) > 500, (len(load.accepted), len(load.unanswered), load.refused)
    live.default.set_delay(0)
    assert_exactly_once(live, load.accepted, load.unanswered)


def restart(live: RunningStack, index: int, signum: int = signal.SIGKILL) -> int:
    code = live.stack.stop_instance(index, signum)
    live.stack.start_instance(index)
    return code


@pytest.fixture
def crashy():
    """Processors that take a while, so a kill finds payments in flight."""
    with quick_stack(PAYCORE_REQUEST_TIMEOUT_MS="1500", PAYCORE_PIN_RELEASE_MS="2500") as live:
        yield live


def test_sigkill_three_times_under_load_loses_and_duplicates_nothing(crashy):
    live = crashy
    live.default.set_delay(40)
    with Load(live) as load:
        for _ in range(3):
            time.sleep(test_random.uniform(1.0, 3.0))
            assert restart(live, 1) == -signal.SIGKILL
            time.sleep(test_random.uniform(0.0, 0.5))
        time.sleep(1.0)
    assert_load_paid_exactly_once(live, load)


def test_payments_in_flight_at_a_kill_are_resolved_by_asking_first(crashy):
    live = crashy
    live.default.set_delay(1000)  # every send is in the air when the instance dies
    direct = live.instance(1)
    ids = [str(random_uuid()) for _ in range(40)]
    for correlation_id in ids:
        assert call(direct, "POST", "/payments", payment(correlation_id))[0] == 202
    time.sleep(0.3)
    live.stack.stop_instance(1, signal.SIGKILL)
    # The sends already made still land at the default; by the restart it looks
    # too slow to use, so a payment sent again without asking would go to the
    # fallback and be paid twice.
    live.default.set_delay(5000)
    time.sleep(1.2)
    live.stack.start_instance(1)
    time.sleep(1.0)
    live.default.set_delay(0)
    assert_exactly_once(live, ids)


def test_a_payment_promised_while_both_processors_fail_is_kept_across_kills(crashy):
    live = crashy
    live.set_both_failing(True)
    direct = live.instance(1)
    ids = [str(random_uuid()) for _ in range(100)]
    for correlation_id in ids:
        assert call(direct, "POST", "/payments", payment(correlation_id))[0] == 202
    restart(live, 1)
    restart(live, 1)
    live.set_both_failing(False)
    assert_exactly_once(live, ids)


def test_the_summary_and_accepted_ids_survive_losing_the_shared_directory():
    with quick_stack() as live:
        ids = [str(random_uuid()) for _ in range(60)]
        for index, correlation_id in enumerate(ids):
            assert call(live.instance(1 + index % 2), "POST", "/payments", payment(correlation_id))[0] == 202
        wait_until_held(live, ids)
        before = assert_ledgers_catch_up(live)
        for index in (1, 2):
            live.stack.stop_instance(index, signal.SIGKILL)
        for name in os.listdir(live.stack.shared_dir):
            os.unlink(live.stack.shared_dir / name)
        for index in (1, 2):
            live.stack.start_instance(index)
        # From the payments record and the journals; the accepted ids of the
        # window from the record.
        assert assert_ledgers_catch_up(live) == before
        status, body = call(live.instance(2), "POST", "/payments", payment(ids[0]))
        assert status == 200 and body == {"message": "payment already accepted"}
        assert_exactly_once(live, ids)


def test_a_payments_record_that_cannot_be_written_holds_sends_to_what_the_ledger_tail_counts():
    """Another process holds the payments record's write lock (a stuck
    writer, an operator's long transaction): the instance's writer waits,
    its settlements stay in its ledger tail, and the dispatcher sends no
    more payments than the tail has room for, so every payment a processor
    holds stays counted. Once the lock goes, the rest are sent and
    everything is committed, each payment once."""
    tail_capacity = 64
    with quick_stack(PAYCORE_LEDGER_TAIL_CAPACITY=str(tail_capacity)) as live:
        holder = sqlite3.connect(live.stack.instance_data_dir(1) / RECORD_FILE, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        ids = [str(random_uuid()) for _ in range(3 * tail_capacity)]
        direct = live.instance(1)
        for correlation_id in ids:
            assert call(direct, "POST", "/payments", payment(correlation_id))[0] == 202
        processed = live.wait_until_processed(tail_capacity)
        assert processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"] == tail_capacity
        assert_ledgers_catch_up(live)
        holder.execute("ROLLBACK")
        holder.close()
        assert_exactly_once(live, ids)
        assert "ledger tail full" not in live.stack.log_path("api1").read_text()


def test_a_journal_that_cannot_be_written_holds_its_answer_and_loses_nothing():
    """The running instance's writes fail, as on a full disk (a file size
    limit set on the process: EFBIG): a payment posted meanwhile gets no
    answer, since no 2xx is given before its journal record is written,
    while summaries are still served. Once writes succeed again it gets its
    202, and each payment is paid exactly once."""
    with quick_stack() as live:
        pid = live.stack.instances[1].pid
        first, held = str(random_uuid()), str(random_uuid())
        assert call(live.instance(1), "POST", "/payments", payment(first))[0] == 202
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
        try:
            waiting = live.instance(1)
            waiting.request("POST", "/payments", body=payment(held))
            wait_until(lambda: value(scrape(live, 1), "paycore_journal_write_errno") == errno.EFBIG, 10)
            assert select.select([waiting.sock], [], [], 0)[0] == []
            assert call(live.instance(1), "GET", "/payments-summary")[0] == 200
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert waiting.getresponse().status == 202
        assert value(scrape(live, 1), "paycore_journal_write_errno") == 0
        assert_exactly_once(live, [first, held])


def test_sigterm_drains_what_it_can_and_exits_0(crashy):
    live = crashy
    ids = [str(random_uuid()) for _ in range(50)]
    for correlation_id in ids:
        assert call(live.instance(1), "POST", "/payments", payment(correlation_id))[0] == 202
    assert live.stack.stop_instance(1, signal.SIGTERM) == 0
    processed = live.processors_summary()
    assert processed["default"]["totalRequests"] + processed["fallback"]["totalRequests"] == 50
    live.stack.start_instance(1)
    assert_exactly_once(live, ids)


def test_sigterm_with_processors_down_keeps_the_rest_for_the_next_start():
    with quick_stack(PAYCORE_DRAIN_TIMEOUT_MS="500") as live:
        live.set_both_failing(True)
        ids = [str(random_uuid()) for _ in range(50)]
        for correlation_id in ids:
            assert call(live.instance(1), "POST", "/payments", payment(correlation_id))[0] == 202
        started = time.monotonic()
        assert live.stack.stop_instance(1, signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        live.set_both_failing(False)
        live.stack.start_instance(1)
        assert_exactly_once(live, ids)


def test_a_draining_instance_refuses_new_payments(crashy):
    live = crashy
    live.set_both_failing(True)
    connection = UnixHTTPConnection(live.stack.socket_path(1))
    assert call(connection, "POST", "/payments", payment())[0] == 202
    live.stack.instances[1].send_signal(signal.SIGTERM)
    time.sleep(0.3)
    status, body = call(connection, "POST", "/payments", payment())
    assert status == 503 and "shutting down" in body["error"]
    live.set_both_failing(False)
    assert live.stack.stop_instance(1, signal.SIGTERM) == 0
