"""The fuzz targets in tests/fuzz/ run for a bounded time from the corpus kept in the repo.

New inputs go to a temporary directory: the repo corpus is only read. A crash,
a timeout or an input over the memory limit fails the test, with libFuzzer's
report; tests/fuzz/run.py replays the input it wrote.
"""
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import test_random

FUZZ_DIR = Path(__file__).parent / "fuzz"
SECONDS_PER_TARGET = 15


@pytest.mark.parametrize("target", ["body", "request"])
def test_fuzzing_finds_nothing(target, tmp_path):
    new_inputs = tmp_path / "corpus"
    new_inputs.mkdir()
    # The fuzzer's own random choices, from the test data's seed (the inputs
    # it reaches in a bounded time still vary with the machine's speed).
    seed = test_random.randrange(1, 2**31)
    run = subprocess.run(
        [sys.executable, FUZZ_DIR / "run.py", target, f"-seed={seed}",
         f"-max_total_time={SECONDS_PER_TARGET}", "-timeout=5", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
         new_inputs, FUZZ_DIR / "corpus" / target],
        check=False, capture_output=True, text=True, timeout=SECONDS_PER_TARGET * 6)
    report = f"-seed={seed}\n" + run.stderr[-20000:]
    assert run.returncode == 0, report
    assert "Done " in run.stderr, report
