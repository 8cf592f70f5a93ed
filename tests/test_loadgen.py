"""The C load generator (perf/loadgen.c), closed loop (ramping VUs) and open
loop (constant arrival rate), against its calibration server
(perf/constant_server.c) and against small Python servers that refuse, stall,
answer slowly, split their answers or close after each one."""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if shutil.which("gcc") is None:
    pytest.skip("gcc is needed to build the load generator", allow_module_level=True)

PERF = Path(__file__).resolve().parent.parent / "perf"
# Slack for an iteration that opens its connection: it is timed from its send.
CONNECT_US = 10_000
sys.path.insert(0, str(PERF))

from report import read_requests  # noqa: E402

UUID_V4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loadgen-bin")
    built = {}
    for name in ("loadgen", "constant_server"):
        built[name] = out / name
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(built[name]),
                        str(PERF / f"{name}.c")], check=True, timeout=60)
    return built


@pytest.fixture
def constant_server(binaries):
    server = subprocess.Popen([str(binaries["constant_server"]), "--listen", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        ready = server.stderr.readline()
        assert ready.startswith("listening on 127.0.0.1:"), ready
        yield int(ready.rsplit(":", 1)[1])
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=5) == 0


@contextlib.contextmanager
def python_server(handle):
    """A threaded TCP server calling handle(connection, stream) per accepted connection."""
    accepted = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            accepted.append(self.client_address)
            handle(self.connection, self.rfile)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 128

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], accepted
    finally:
        server.shutdown()
        server.server_close()


def read_request(stream) -> tuple[bytes, dict[str, str], bytes] | None:
    request_line = stream.readline()
    if not request_line:
        return None
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return request_line, headers, stream.read(int(headers.get("content-length", 0)))


class Run:
    def __init__(self, completed: subprocess.CompletedProcess, out: Path) -> None:
        self.returncode = completed.returncode
        lines = completed.stdout.strip().splitlines()
        assert len(lines) == 1, completed.stdout
        self.summary = json.loads(lines[0])
        with out.open(newline="") as handle:
            assert next(csv.reader(handle)) == ["start_us", "latency_us", "status", "read_latency_us",
                                                "new_connection"]
        self.rows = read_requests(out)


def run_loadgen(binaries, tmp_path: Path, port: int, *args: str, timeout: float = 20) -> Run:
    out = tmp_path / "results.csv"
    completed = subprocess.run(
        [str(binaries["loadgen"]), "--target", f"127.0.0.1:{port}", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr
    return Run(completed, out)


def nearest_rank(sorted_values: list[int], permille: int) -> int:
    return sorted_values[(len(sorted_values) * permille + 999) // 1000 - 1]


def test_ramp_against_constant_server(binaries, tmp_path, constant_server):
    duration_s, max_vus, think_s = 4.0, 50, 0.1
    run = run_loadgen(binaries, tmp_path, constant_server, "--duration", str(duration_s),
                      "--max-vus", str(max_vus), "--think-ms", str(int(think_s * 1000)))

    summary, rows = run.summary, run.rows
    assert summary["requests"] == len(rows) == summary["ok_2xx"]
    assert summary["failed"] == summary["other_status"] == 0
    assert {row.status for row in rows} == {202}

    # VU i >= 1 joins at duration * i / (max_vus - 1) and loops until the duration is over.
    active_s = [duration_s * (1 - i / (max_vus - 1)) for i in range(max_vus)]
    expected = sum(math.ceil(active / think_s) for active in active_s)
    assert 0.8 * expected <= len(rows) <= expected + max_vus

    latencies = [row.latency_us for row in rows]
    assert min(latencies) > 0 and max(latencies) < 100_000
    assert summary["p50_us"] < 5_000
    # A response arrives before it is read: the arrival time is the kernel's.
    assert summary["unstamped"] == 0
    assert all(row.latency_us <= row.read_latency_us for row in rows)
    # The constant server keeps every connection open: each VU opens one, for its first request.
    assert sum(row.new_connection for row in rows) == sum(1 for active in active_s if active > 0)
    for prefix, ordered in (("", sorted(latencies)), ("read_", sorted(row.read_latency_us for row in rows))):
        for name, permille in (("p50_us", 500), ("p90_us", 900), ("p99_us", 990),
                               ("p999_us", 999), ("max_us", 1000)):
            assert summary[prefix + name] == nearest_rank(ordered, permille), prefix + name

    # Rows are in completion order and start within the run.
    completions = [row.start_us + row.read_latency_us for row in rows]
    assert [pair for pair in zip(completions, completions[1:]) if pair[1] < pair[0] - 2] == []
    starts = [row.start_us for row in rows]
    assert min(starts) >= 0 and max(starts) <= duration_s * 1e6 + 100
    assert summary["duration_s"] <= duration_s + 1.5
    assert summary["cpu_user_s"] + summary["cpu_sys_s"] < duration_s
    assert summary["max_rss_kb"] > 0


def test_start_vus_begin_together(binaries, tmp_path, constant_server):
    run = run_loadgen(binaries, tmp_path, constant_server, "--duration", "1", "--max-vus", "5",
                      "--start-vus", "5", "--think-ms", "200")
    assert sum(1 for row in run.rows if row.start_us < 100_000) == 5
    assert len(run.rows) == 25


def test_refused_connections_fail_and_retry_after_think_time(binaries, tmp_path):
    # A port that is bound and not listening refuses every connection.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        run = run_loadgen(binaries, tmp_path, closed.getsockname()[1], "--duration", "1", "--max-vus", "5",
                          "--think-ms", "50")
    assert len(run.rows) >= 20
    assert all(row.status == 0 for row in run.rows)
    assert run.summary["failed"] == run.summary["requests"] == len(run.rows)
    assert run.summary["ok_2xx"] == 0 and run.summary["p99_us"] is None


def test_unanswered_requests_time_out_and_reconnect(binaries, tmp_path):
    def never_answer(connection, stream) -> None:
        while stream.read1(4096):
            pass

    with python_server(never_answer) as (port, accepted):
        run = run_loadgen(binaries, tmp_path, port, "--duration", "1", "--max-vus", "3",
                          "--think-ms", "50", "--timeout-ms", "200")
        connections = len(accepted)

    assert len(run.rows) >= 4
    assert all(row.status == 0 and 200_000 <= row.latency_us < 400_000 for row in run.rows)
    assert run.summary["failed"] == run.summary["requests"] == len(run.rows)
    assert connections == len(run.rows)
    assert run.summary["duration_s"] < 1.5


def test_requests_are_well_formed_and_split_answers_are_reassembled(binaries, tmp_path):
    received = []

    def answer_in_pieces(connection, stream) -> None:
        while (request := read_request(stream)) is not None:
            received.append(request)
            for piece in (b"HTTP/1.1 201 Created\r\ncontent-LENGTH:", b" 5\r\n\r", b"\nab", b"cde"):
                connection.sendall(piece)
                time.sleep(0.001)

    with python_server(answer_in_pieces) as (port, accepted):
        run = run_loadgen(binaries, tmp_path, port, "--duration", "2", "--max-vus", "10",
                          "--think-ms", "20", "--amount", "19.90", "--path", "/payments")
        connections = len(accepted)

    assert run.summary["ok_2xx"] == run.summary["requests"] == len(run.rows) == len(received)
    assert {row.status for row in run.rows} == {201}
    assert all(row.latency_us >= 3_000 for row in run.rows)
    assert connections == 9  # one keep-alive connection per VU that started
    ids = []
    for request_line, headers, body in received:
        assert request_line == b"POST /payments HTTP/1.1\r\n"
        assert headers["host"] == f"127.0.0.1:{port}"
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        payload = json.loads(body)
        assert payload["amount"] == 19.90 and set(payload) == {"correlationId", "amount"}
        assert UUID_V4.fullmatch(payload["correlationId"].encode())
        ids.append(payload["correlationId"])
    assert len(set(ids)) == len(ids)


def test_connection_close_answers_reconnect(binaries, tmp_path):
    def answer_and_close(connection, stream) -> None:
        if read_request(stream) is not None:
            connection.sendall(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n"
                               b"Content-Length: 2\r\n\r\n{}")

    with python_server(answer_and_close) as (port, accepted):
        run = run_loadgen(binaries, tmp_path, port, "--duration", "1", "--max-vus", "5",
                          "--think-ms", "20")
        connections = len(accepted)

    assert {row.status for row in run.rows} == {202}
    assert len(run.rows) >= 50
    assert connections == len(run.rows)
    assert all(row.new_connection for row in run.rows)


def test_sigterm_stops_and_reports(binaries, tmp_path, constant_server):
    out = tmp_path / "results.csv"
    loadgen = subprocess.Popen(
        [str(binaries["loadgen"]), "--target", f"127.0.0.1:{constant_server}", "--duration", "60",
         "--max-vus", "10", "--think-ms", "50", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    started = time.monotonic()
    loadgen.send_signal(signal.SIGTERM)
    stdout, stderr = loadgen.communicate(timeout=5)
    assert loadgen.returncode == 0, stderr
    assert time.monotonic() - started < 1
    run = Run(subprocess.CompletedProcess(loadgen.args, 0, stdout, stderr), out)
    assert run.summary["requests"] == len(run.rows) > 0
    assert run.summary["ok_2xx"] == len(run.rows)


def realtime_offset_s() -> float:
    """How far the realtime clock is from the monotonic one (the kernel's
    receive stamps are realtime; this VM's realtime clock is stepped now and then)."""
    return time.time() - time.monotonic()


def test_a_response_is_timed_to_its_arrival_not_to_a_late_read(binaries, tmp_path):
    """The generator is stopped while each answer arrives: the read comes 100 ms
    late, the arrival time does not move. A run during which the realtime clock
    was stepped says nothing of that (its stamps moved with the clock): it is
    run again, once."""
    for attempt in range(2):
        offset_before = realtime_offset_s()
        run = _run_stopped_at_each_answer(binaries, tmp_path / f"results-{attempt}.csv")
        if abs(realtime_offset_s() - offset_before) < 0.01:
            break
    assert len(run.rows) >= 3 and {row.status for row in run.rows} == {202}
    assert all(row.read_latency_us >= 100_000 for row in run.rows)
    # Each answer arrived before the 100 ms stop and was read after it: however
    # long the server took to answer, the stop is not in the latency. (Slack for
    # the realtime clock's slewing against the monotonic one over those 100 ms.)
    assert [row for row in run.rows if row.read_latency_us - row.latency_us < 99_000] == []
    assert run.summary["unstamped"] == 0


def _run_stopped_at_each_answer(binaries, out: Path) -> Run:
    started = threading.Event()
    loadgen_pid = []

    def answer_while_the_generator_is_stopped(connection, stream) -> None:
        assert started.wait(timeout=5)
        while read_request(stream) is not None:
            os.kill(loadgen_pid[0], signal.SIGSTOP)
            connection.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
            time.sleep(0.1)
            os.kill(loadgen_pid[0], signal.SIGCONT)

    with python_server(answer_while_the_generator_is_stopped) as (port, _):
        loadgen = subprocess.Popen(
            [str(binaries["loadgen"]), "--target", f"127.0.0.1:{port}", "--duration", "1",
             "--max-vus", "1", "--think-ms", "100", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        loadgen_pid.append(loadgen.pid)
        started.set()
        stdout, stderr = loadgen.communicate(timeout=10)
    assert loadgen.returncode == 0, stderr
    return Run(subprocess.CompletedProcess(loadgen.args, 0, stdout, stderr), out)

def test_arrivals_start_on_schedule_whatever_the_answers(binaries, tmp_path, constant_server):
    rate, duration_s = 500, 2.0
    run = run_loadgen(binaries, tmp_path, constant_server, "--rate", str(rate), "--duration", str(duration_s),
                      "--start-vus", "10", "--max-vus", "200")
    summary, rows = run.summary, run.rows
    assert summary["requests"] == summary["started"] == summary["ok_2xx"] == len(rows)
    assert summary["started"] + summary["dropped"] == rate * duration_s
    # The i-th start is never before the i-th arrival is due, and no later than the
    # generator's worst lag allows, give or take a connect (a row is timed from its
    # request's send, and one that opened its connection sent after the connect).
    starts = sorted(row.start_us for row in rows)
    off = [(i, start) for i, start in enumerate(starts)
           if not i * 1e6 / rate - 1 <= start <= i * 1e6 / rate + summary["max_start_lag_us"] + CONNECT_US]
    assert not off, (off[:5], summary)
    # the VUs take turns (first in, first out): each of the 10 pre-allocated (and any
    # added) opened its connection, the constant server keeps them all open
    assert sum(row.new_connection for row in rows) == summary["vus"] >= 10


def test_a_warm_up_opens_the_connections_and_is_left_out(binaries, tmp_path, constant_server):
    started_ms = time.time() * 1000
    run = run_loadgen(binaries, tmp_path, constant_server, "--rate", "200", "--duration", "1",
                      "--warmup", "0.5", "--start-vus", "20", "--max-vus", "20")
    summary = run.summary
    # iterations due in the first 0.5 s are the warm-up's, however late they started
    assert summary["requests"] == summary["ok_2xx"] == len(run.rows)
    assert summary["requests"] + summary["dropped"] == 200
    assert summary["warmup_ok_2xx"] <= 100 and summary["warmup_ok_2xx"] + summary["requests"] >= 200 - 20
    assert min(row.start_us for row in run.rows) >= 0
    # the warm-up's 100 iterations opened all 20 connections, and the pool cannot grow
    assert not any(row.new_connection for row in run.rows)
    assert started_ms + 400 <= summary["origin_unix_ms"] <= started_ms + 2_000


def test_the_pool_grows_while_every_vu_waits_for_an_answer(binaries, tmp_path):
    received = []

    def answer_after_100_ms(connection, stream) -> None:
        while (request := read_request(stream)) is not None:
            received.append(request)
            time.sleep(0.1)
            connection.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")

    with python_server(answer_after_100_ms) as (port, accepted):
        run = run_loadgen(binaries, tmp_path, port, "--rate", "100", "--duration", "1", "--start-vus", "2",
                          "--max-vus", "100", "--requested-at", "2025-07-15T12:00:00.000Z")
        connections = len(accepted)
    assert run.summary["ok_2xx"] == len(run.rows) == 100 and run.summary["dropped"] == 0
    # about rate x latency (10) VUs are busy at once: the pool grew from 2 to that, not to its maximum
    assert 8 <= run.summary["vus"] == connections <= 50
    assert all(row.latency_us >= 100_000 for row in run.rows)
    payload = json.loads(received[0][2])
    assert set(payload) == {"correlationId", "amount", "requestedAt"}
    assert payload["requestedAt"] == "2025-07-15T12:00:00.000Z"


def test_iterations_without_a_free_vu_are_dropped(binaries, tmp_path):
    def never_answer(connection, stream) -> None:
        while stream.read1(4096):
            pass

    with python_server(never_answer) as (port, _):
        run = run_loadgen(binaries, tmp_path, port, "--rate", "100", "--duration", "1", "--max-vus", "5",
                          "--timeout-ms", "1200")
    summary = run.summary
    assert summary["started"] == summary["failed"] == len(run.rows) == 5
    assert summary["dropped"] == 95 and summary["ok_2xx"] == 0
    assert all(1_200_000 <= row.latency_us < 1_500_000 for row in run.rows)


def test_refusals_are_counted_by_body_and_progress_is_reported(binaries, tmp_path):
    answers = [b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
               b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 22\r\n\r\n{"error":"queue full"}',
               b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\n\r\n{"error":"shutdown"}']
    numbers = itertools.count(1)  # next() is atomic: each request gets its own number

    def refuse_some(connection, stream) -> None:
        while read_request(stream) is not None:
            number = next(numbers)
            connection.sendall(answers[0] if number % 2 else answers[1 + number % 4 // 2])

    out = tmp_path / "results.csv"
    with python_server(refuse_some) as (port, _):
        completed = subprocess.run(
            [str(binaries["loadgen"]), "--target", f"127.0.0.1:{port}", "--rate", "200", "--duration", "1",
             "--max-vus", "100", "--progress-ms", "250", "--out", str(out)],
            capture_output=True, text=True, timeout=20)
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    progress, summary = lines[:-1], lines[-1]
    assert 3 <= len(progress) <= 5 and all(line["progress"] for line in progress)
    assert [line["requests"] for line in progress] == sorted(line["requests"] for line in progress)
    requests = summary["requests"]
    assert requests + summary["dropped"] == 200 and summary["failed"] == 0
    assert summary["ok_2xx"] == (requests + 1) // 2 and summary["other_status"] == requests // 2
    assert sorted((kind["body"], kind["count"]) for kind in summary["answers"]) == [
        ('{"error":"queue full"}', requests // 4), ('{"error":"shutdown"}', (requests + 2) // 4)]
    assert {kind["status"] for kind in summary["answers"]} == {503}
    assert progress[-1]["answers"] and progress[0]["p99_us"] is not None


VALID = ["--target", "127.0.0.1:1", "--duration", "1", "--max-vus", "3", "--out", "x.csv"]


@pytest.mark.parametrize("args", [
    [],
    VALID[:-2],
    VALID + ["--max-vus", "0"],
    VALID + ["--duration", "-1"],
    VALID + ["--think-ms", "x"],
    VALID + ["--start-vus", "5"],
    VALID + ["--target", "127.0.0.1"],
    VALID + ["--amount", "1e3"],
    VALID + ["--path", "payments"],
    VALID + ["--bogus", "1"],
    VALID + ["--rate", "0"],
    VALID + ["--rate", "fast"],
    VALID + ["--progress-ms", "0"],
    VALID + ["--requested-at", 'a"b'],
    VALID + ["--warmup", "1"],
])
def test_bad_arguments_exit_2(binaries, tmp_path, args):
    completed = subprocess.run([str(binaries["loadgen"]), *args], capture_output=True, text=True,
                               timeout=5, cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stdout == "" and completed.stderr
    assert not (tmp_path / "x.csv").exists()
