"""make bench-compare: this checkout against another commit, full rounds of
`make bench` alternating in one session. This host's p99 swings more from one
hour to the next than most changes move it, so a change is judged by rounds
run side by side, and by the median of their ratios, never by one round.

COMPARE_REF (required): the commit, branch or tag to compare with. It is
checked out, detached, as a git worktree in COMPARE_DIR (by default
~/.cache/paycore/compare/<commit>, kept for the next comparison), and its
rounds run through its own `make bench`, which installs what it needs.
COMPARE_PAIRS (default 3): rounds of each, this checkout first in each pair.
Each round runs with BENCH_FLOOR=0 and BENCH_JOURNAL=tmpfs unless they are
set; BENCH_SECONDS, BENCH_JOURNAL and BENCH_STORE reach both checkouts.

Prints, per pair and checkout: POST p50 / p99 / p99.9, the median of the
10 s windows' p99 (steadier than the round's p99 when the host is disturbed
for a few seconds), the stack's CPU, and failed / inconsistencies / lag;
then the ratios, this checkout over the other, and their medians. Each
round's full output is in perf/results/compare-<time>-<pair>-<side>.log.

Exit status: 0 when every round had no failed request, no inconsistency
and no lag; 1 otherwise.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

from report import read_requests, window_percentiles  # noqa: E402

RESULTS = REPO / "perf" / "results"
ROUND_ENV = {"BENCH_FLOOR": "0", "BENCH_JOURNAL": "tmpfs"}
RESULTS_LINE = re.compile(r"^results: (\S+\.json)", re.MULTILINE)


class Round(NamedTuple):
    """What one round of `make bench` measured (its first variant)."""

    p50_ms: float
    p99_ms: float
    p999_ms: float
    window_p99_ms: float   # the median of the 10 s windows' p99
    cpu_s: float           # the instances' CPU (api1 + api2 ...)
    failed: int
    inconsistencies: int
    lag: int

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.inconsistencies == 0 and self.lag == 0


RATIOS = (("POST p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"),
          ("10 s windows' p99", "window_p99_ms"), ("CPU", "cpu_s"))


def read_round(result_json: Path) -> Round:
    """A round from the files `perf/bench.py` writes: bench-<time>.json, and
    bench-<time>-requests.csv beside it for the windows."""
    result = json.loads(result_json.read_text())
    run = result["paycore"]
    latency = run["post_latency_ms"]
    requests = read_requests(result_json.with_name(result_json.stem + "-requests.csv"))
    windows = [p99 for _, p99 in window_percentiles(requests, 0.99)]
    return Round(
        p50_ms=latency["p50"], p99_ms=latency["p99"], p999_ms=latency["p99.9"],
        window_p99_ms=statistics.median(windows) if windows else 0.0,
        cpu_s=sum(usage["cpu_s"] for name, usage in run["stack"].items() if name.startswith("api")),
        failed=run["failed"], inconsistencies=result["multa"]["composicao"]["total_inconsistencias"],
        lag=result["lag"]["lag"])


def ratios(this: Round, other: Round) -> dict[str, float]:
    """This round's figures over the other's, by name (RATIOS)."""
    return {name: getattr(this, field) / getattr(other, field) if getattr(other, field) else float("nan")
            for name, field in RATIOS}


def median_ratios(pairs: Sequence[tuple[Round, Round]]) -> dict[str, float]:
    """The median over the pairs of each ratio: one disturbed pair moves it little."""
    per_pair = [ratios(this, other) for this, other in pairs]
    return {name: statistics.median(ratio[name] for ratio in per_pair) for name, _ in RATIOS}


def describe(label: str, measured: Round) -> str:
    return (f"{label:<24} {measured.p50_ms:7.3f} {measured.p99_ms:7.3f} {measured.p999_ms:7.3f}"
            f" {measured.window_p99_ms:9.3f} {measured.cpu_s:7.1f}"
            f"   {measured.failed} / {measured.inconsistencies} / {measured.lag}")


def describe_ratios(label: str, ratio: dict[str, float]) -> str:
    return f"{label:<24} " + "  ".join(f"{name} {value:.2f}x" for name, value in ratio.items())


def worktree(ref: str, repo: Path = REPO, directory: Path | None = None) -> Path:
    """A detached checkout of ref, made once and kept: COMPARE_DIR, or a
    directory per commit in the user's cache."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    if directory is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        directory = cache / "paycore" / "compare" / commit
    if not directory.exists():
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(directory), commit],
                       check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()
    if head != commit:
        raise SystemExit(f"{directory} holds {head}, not {ref} ({commit}): remove it or set COMPARE_DIR")
    return directory


def run_round(command: list[str], cwd: Path, log: Path) -> Round:
    """One round; its output goes to log, its figures are read from the files it names."""
    env = {**ROUND_ENV, **os.environ}
    with log.open("w") as output:
        subprocess.run(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, check=False)
    found = RESULTS_LINE.search(log.read_text())
    if found is None:
        raise SystemExit(f"the round in {cwd} wrote no results: see {log}")
    return read_round(cwd / found.group(1))  # the path printed, absolute or from cwd


def main() -> int:
    ref = os.environ.get("COMPARE_REF")
    if not ref:
        raise SystemExit("COMPARE_REF: the commit, branch or tag to compare this checkout with")
    pairs = int(os.environ.get("COMPARE_PAIRS", "3"))
    directory = os.environ.get("COMPARE_DIR")
    other_tree = worktree(ref, directory=Path(directory) if directory else None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    sides = (("this checkout", [sys.executable, "perf/bench.py"], REPO),
             (ref, ["make", "bench"], other_tree))
    print(f"{pairs} pairs: this checkout against {ref} ({other_tree}); round logs in {RESULTS}")
    print(f"{'':<24} {'p50':>7} {'p99':>7} {'p99.9':>7} {'windows':>9} {'CPU s':>7}   failed / incons. / lag")
    measured: list[tuple[Round, Round]] = []
    for pair in range(1, pairs + 1):
        rounds = []
        for side, (label, command, cwd) in enumerate(sides):
            log = RESULTS / f"compare-{stamp}-{pair}-{'this' if side == 0 else 'other'}.log"
            rounds.append(run_round(command, cwd, log))
            print(describe(f"{pair} {label}", rounds[-1]), flush=True)
        measured.append((rounds[0], rounds[1]))
        print(describe_ratios(f"{pair} this / other", ratios(*measured[-1])), flush=True)
    print(describe_ratios("median of the pairs", median_ratios(measured)))
    return 0 if all(this.clean and other.clean for this, other in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
