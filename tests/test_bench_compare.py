"""make bench-compare (perf/compare.py): reading a round's files, the ratios
and their medians, the other commit's worktree, and a round's output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

from compare import Round, median_ratios, ratios, read_round, run_round, worktree  # noqa: E402


def write_round(directory: Path, name: str, latencies_ms_by_window: list[list[float]], *,
                failed: int = 0, cpu_s: tuple[float, float] = (10.0, 12.0)) -> Path:
    """The two files perf/bench.py writes for a round, with these latencies
    in consecutive 10 s windows."""
    rows = ["start_us,latency_us,status,read_latency_us,new_connection"]
    for window, latencies in enumerate(latencies_ms_by_window):
        for index, latency in enumerate(latencies):
            start_us = window * 10_000_000 + index * 1000
            rows.append(f"{start_us},{int(latency * 1000)},202,{int(latency * 1000)},0")
    (directory / f"{name}-requests.csv").write_text("\n".join(rows) + "\n")
    result = {
        "paycore": {"post_latency_ms": {"p50": 0.1, "p99": 0.5, "p99.9": 1.5}, "failed": failed,
                    "stack": {"load-balancer": {"cpu_s": 0.5}, "api1": {"cpu_s": cpu_s[0]},
                              "api2": {"cpu_s": cpu_s[1]}}},
        "multa": {"composicao": {"total_inconsistencias": 0}},
        "lag": {"lag": 0},
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_a_round_is_read_from_the_files_bench_writes(tmp_path):
    # Windows whose p99 are about 1, 2 and 9 ms: the median window is the middle one.
    path = write_round(tmp_path, "bench-1", [[1.0] * 100, [2.0] * 100, [9.0] * 100])
    measured = read_round(path)
    assert (measured.p50_ms, measured.p99_ms, measured.p999_ms) == (0.1, 0.5, 1.5)
    assert measured.window_p99_ms == pytest.approx(2.0)
    assert measured.cpu_s == 22.0  # the instances only, not the balancer
    assert measured.clean
    assert not read_round(write_round(tmp_path, "bench-2", [[1.0]], failed=3)).clean


def measured_round(p99_ms: float, cpu_s: float = 20.0) -> Round:
    return Round(p50_ms=0.1, p99_ms=p99_ms, p999_ms=1.0, window_p99_ms=p99_ms, cpu_s=cpu_s,
                 failed=0, inconsistencies=0, lag=0)


def test_ratios_are_this_over_the_other_and_their_median_ignores_one_disturbed_pair():
    pairs = [(measured_round(0.6, 30.0), measured_round(0.5, 20.0)),
             (measured_round(6.0, 30.0), measured_round(0.5, 20.0)),  # a disturbed round
             (measured_round(0.55, 30.0), measured_round(0.5, 20.0))]
    assert ratios(*pairs[0])["p99"] == pytest.approx(1.2)
    median = median_ratios(pairs)
    assert median["p99"] == pytest.approx(1.2)
    assert median["CPU"] == pytest.approx(1.5)
    assert median["POST p50"] == pytest.approx(1.0)


def git(repo: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *arguments], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_the_other_commit_is_checked_out_once_and_kept(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for content in ("first", "second"):
        (repo / "file").write_text(content)
        git(repo, "add", "file")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "-m", content)
    first = git(repo, "rev-parse", "HEAD~1")
    checkout = worktree("HEAD~1", repo, tmp_path / "other")
    assert git(checkout, "rev-parse", "HEAD") == first
    assert (checkout / "file").read_text() == "first"
    (checkout / "built").write_text("kept")  # what its own make bench leaves
    assert worktree(first, repo, tmp_path / "other") == checkout
    assert (checkout / "built").read_text() == "kept"
    with pytest.raises(SystemExit, match="not HEAD"):
        worktree("HEAD", repo, tmp_path / "other")


def test_a_round_is_found_by_the_results_line_it_prints(tmp_path):
    path = write_round(tmp_path, "bench-3", [[0.4] * 10])
    printing = [sys.executable, "-c", f"print('round: embedded, tmpfs'); print('results: {path.name} (+ .png)')"]
    assert run_round(printing, tmp_path, tmp_path / "round.log").p99_ms == 0.5
    silent = [sys.executable, "-c", "print('the stack did not start')"]
    with pytest.raises(SystemExit, match="wrote no results"):
        run_round(silent, tmp_path, tmp_path / "silent.log")
    assert (tmp_path / "silent.log").read_text() == "the stack did not start\n"
