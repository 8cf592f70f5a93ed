"""The paycore command: help, exit codes, and each subcommand doing its job."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from paycore.ready import start_listening

PAYCORE = [sys.executable, "-m", "paycore.cli"]


def paycore(*arguments: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*PAYCORE, *arguments], capture_output=True, text=True, timeout=timeout)


def listening(arguments: list[str], stderr) -> tuple[subprocess.Popen, int]:
    """`paycore ARGUMENTS...` told to listen on port 0, once it listens, and the port it took."""
    process, (address,) = start_listening([*PAYCORE, *arguments], 15, stdout=subprocess.DEVNULL,
                                          stderr=stderr, text=True)
    return process, int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("command", [[], ["serve"], ["balance"], ["processor"], ["stack"], ["summary"],
                                     ["bench"]])
def test_every_command_has_help(command):
    finished = paycore(*command, "--help")
    assert finished.returncode == 0
    assert "usage:" in finished.stdout


def test_usage_errors_exit_2():
    assert paycore().returncode == 2
    assert paycore("nonsense").returncode == 2
    assert paycore("summary", "--from", "yesterday").returncode == 2
    assert paycore("processor", "--fee", "abc").returncode == 2
    assert paycore("bench", "--seconds", "0").returncode == 2


def test_bench_calibration_runs_and_reports():
    finished = paycore("bench", "--calibrate", "--seconds", "2", timeout=60)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["target"] == "constant-response server" and report["requests"] > 0


def test_bench_outside_a_source_checkout_is_a_usage_error(tmp_path, monkeypatch):
    from paycore import cli

    monkeypatch.setattr(cli, "benchmark_script", lambda: tmp_path / "perf" / "bench.py")
    assert cli.main(["bench", "--seconds", "5"]) == 2


def test_summary_of_the_running_service(live):
    finished = paycore("summary", "--url", f"http://127.0.0.1:{live.port}",
                       "--from", "2020-01-01T00:00:00.000Z", "--to", "2030-01-01T00:00:00Z")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == {"default": {"totalRequests": 0, "totalAmount": 0},
                                           "fallback": {"totalRequests": 0, "totalAmount": 0}}


def test_summary_exit_codes_for_errors(live):
    # A processor has no /payments-summary: the service answered, with an error.
    assert paycore("summary", "--url", live.stack.default_url).returncode == 1
    # A port that is bound and not listening refuses every connection.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        assert paycore("summary", "--url", f"http://127.0.0.1:{closed.getsockname()[1]}").returncode == 3


def serve(name: str, shared_dir, running_stack, stderr) -> tuple[subprocess.Popen, int]:
    """`paycore serve` using the stack's processors, once it listens; and its port."""
    return listening(["serve", "--instance", name, "--listen", "127.0.0.1:0",
                      "--shared-dir", str(shared_dir), "--default-url", running_stack.stack.default_url,
                      "--fallback-url", running_stack.stack.fallback_url], stderr)


def test_serve_runs_an_instance_and_stops_cleanly_on_sigterm(tmp_path, running_stack):
    instance, port = serve("cli", tmp_path, running_stack, subprocess.DEVNULL)
    try:
        assert paycore("summary", "--url", f"http://127.0.0.1:{port}").returncode == 0
    finally:
        instance.send_signal(signal.SIGTERM)
        assert instance.wait(15) == 0


def test_instance_logs_are_json_lines_and_quiet_per_request(tmp_path, running_stack):
    instance, port = serve("logs", tmp_path, running_stack, subprocess.PIPE)
    try:
        for _ in range(20):
            assert paycore("summary", "--url", f"http://127.0.0.1:{port}").returncode == 0
    finally:
        instance.send_signal(signal.SIGTERM)
        _, stderr = instance.communicate(timeout=15)
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any("listening" in line["message"] for line in lines)
    assert len(lines) < 10  # 20 requests logged nothing


def test_balance_hands_connections_to_the_instances_it_is_given(tmp_path, running_stack):
    balancer, port = listening(["balance", "--listen", "127.0.0.1:0",
                                "--instances", running_stack.stack.handoff_path(1)], subprocess.DEVNULL)
    try:
        assert paycore("summary", "--url", f"http://127.0.0.1:{port}").returncode == 0
        balancer.send_signal(signal.SIGTERM)
        assert balancer.wait(10) == 0
    finally:
        balancer.kill()
        balancer.wait()
