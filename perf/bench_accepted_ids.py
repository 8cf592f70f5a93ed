"""What claiming a correlationId costs, in the idempotency window against the
fixed-size table it replaced, and the file bytes each spends per id it holds.

The window is sized for 1 h at 600 payments/s (2,160,000 ids) and measured at
its steady state: its clock held still, it is fed until every sub-table has
been filled to its load limit (epochs then turn over by load alone, as under
sustained traffic). The
fixed-size table (its default 524,288 slots, built from git at --baseline:
by default the last commit that had it) is measured just below the three
quarters at which it refused ids for good. Each sample times BATCH calls of
claim() from Python (new ids, then confirm() of those, then claims of ids
already durable, drawn at random from everything still remembered); the
figures are medians of the samples' ns per call, both tables in one run.
Run: .venv/bin/python perf/bench_accepted_ids.py
(--capacity, --subtables, --load-factor and --baseline-slots try other sizes.)
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paycore.core.accepted_ids import CLAIMED, DUPLICATE, AcceptedIds

REPOSITORY = Path(__file__).resolve().parents[1]
CAPACITY = 2_160_000
WINDOW_MS = 3_600_000
BASELINE_SLOTS = 1 << 19
BATCH = 10_000
SAMPLES = 21
SEED = 20250705
# Every SAMPLE_EVERY-th id claimed is kept to be claimed again as a duplicate.
SAMPLE_EVERY = 16

BUILD_BASELINE = """
from Cython.Build import cythonize
from setuptools import Extension, setup
setup(
    script_args=["build_ext", "--inplace", "--quiet"],
    ext_modules=cythonize(
        [Extension("accepted_ids_baseline", ["accepted_ids_baseline.pyx"], extra_compile_args=["-O2"])],
        include_path=[{include!r}], language_level=3, quiet=True,
        compiler_directives={{"boundscheck": False, "wraparound": False, "cdivision": True,
                              "initializedcheck": False}},
    ),
)
"""


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=REPOSITORY, check=True,
                          capture_output=True, text=True).stdout


def last_fixed_size_commit() -> str:
    """The parent of the newest commit that took the FULL answer away."""
    removal = git("log", "-1", "--format=%H", "-S", "ID_FULL", "--", "pyx/accepted_ids.pyx").strip()
    return git("rev-parse", f"{removal}^").strip()


def build_baseline(ref: str, directory: Path):
    for suffix in ("pyx", "pxd"):
        source = git("show", f"{ref}:pyx/accepted_ids.{suffix}")
        (directory / f"accepted_ids_baseline.{suffix}").write_text(source)
    include = str(REPOSITORY / "build" / "cython-include")
    built = subprocess.run([sys.executable, "-c", BUILD_BASELINE.format(include=include)],
                           cwd=directory, capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"building the table at {ref} failed:\n{built.stderr}")
    sys.path.insert(0, str(directory))
    return importlib.import_module("accepted_ids_baseline")


def ns_per_call(call, keys: list[bytes], *arguments) -> float:
    started = time.perf_counter_ns()
    for key in keys:
        call(key, *arguments)
    return (time.perf_counter_ns() - started) / len(keys)


def fresh_ids(count: int) -> list[bytes]:
    return [random.randbytes(16) for _ in range(count)]


def measure(claim, confirm, remembered: collections.deque) -> dict[str, float]:
    samples: dict[str, list[float]] = {"new": [], "confirm": [], "duplicate": []}
    for _ in range(SAMPLES):
        new = fresh_ids(BATCH)
        samples["new"].append(ns_per_call(claim, new, 2005))
        if confirm is not None:
            samples["confirm"].append(ns_per_call(confirm, new))
        again = random.sample(remembered, BATCH)
        samples["duplicate"].append(ns_per_call(claim, again, 2005))
        assert claim(new[0], 2005) == DUPLICATE and claim(again[-1], 2005) == DUPLICATE
        remembered.extend(new[::SAMPLE_EVERY])
    return {name: statistics.median(values) for name, values in samples.items() if values}


def window_figures(directory: str, capacity: int, subtables: int, load_factor: float) -> tuple[dict, AcceptedIds]:
    ids = AcceptedIds(os.path.join(directory, "window"), "bench", capacity, WINDOW_MS,
                      subtables=subtables, load_factor=load_factor)
    ids._now_ms = ids._now_ms
    # Only ids of the last capacity claims are sure to be live.
    remembered: collections.deque = collections.deque(maxlen=capacity // SAMPLE_EVERY)
    while ids.early_advances < subtables:
        for key in fresh_ids(BATCH):
            assert ids.claim(key, 2005) == CLAIMED
            ids.confirm(key)
            if random.randrange(SAMPLE_EVERY) == 0:
                remembered.append(key)
    return measure(ids.claim, ids.confirm, remembered), ids


def baseline_figures(directory: str, module, slots: int) -> tuple[dict, object]:
    table = module.AcceptedIds(os.path.join(directory, "fixed"), slots)
    limit = slots * 3 // 4
    # Just below the limit once every sample's new ids are in.
    keys = fresh_ids(limit - SAMPLES * BATCH - 1)
    for key in keys:
        assert table.claim(key, 2005) == module.CLAIMED
    remembered = collections.deque(keys[::SAMPLE_EVERY])
    return measure(table.claim, None, remembered), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=CAPACITY)
    parser.add_argument("--subtables", type=int, default=5)
    parser.add_argument("--load-factor", type=float, default=0.75)
    parser.add_argument("--baseline-slots", type=int, default=BASELINE_SLOTS)
    parser.add_argument("--baseline", help="git revision of the fixed-size table (default: the last one)")
    options = parser.parse_args()
    random.seed(SEED)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        module = build_baseline(options.baseline or last_fixed_size_commit(), Path(directory))
        window, ids = window_figures(directory, options.capacity, options.subtables, options.load_factor)
        fixed, table = baseline_figures(directory, module, options.baseline_slots)
        print(f"window: capacity {ids.capacity:,} ids per {ids.window_ms // 1000} s, {ids.subtables} "
              f"sub-tables at load factor {options.load_factor}, {ids.file_bytes / 2**20:.0f} MiB: "
              f"{ids.file_bytes / ids.capacity:.1f} bytes per id; {ids.live_ids:,} ids live after "
              f"{ids.early_advances} epochs ended by load")
        fixed_ids = table.slots * 3 // 4
        fixed_bytes = os.path.getsize(os.path.join(directory, "fixed"))
        print(f"fixed: {table.slots:,} slots, {fixed_bytes / 2**20:.0f} MiB: "
              f"{fixed_bytes / fixed_ids:.1f} bytes per id, {fixed_ids:,} ids ever, {len(table):,} held")
        print(f"{'ns per call (median)':<24} {'window':>8} {'fixed':>8}")
        for name in ("new", "duplicate", "confirm"):
            print(f"{name:<24} {window[name]:>8.0f} {fixed.get(name, float('nan')):>8.0f}")
        ids.close()
        table.close()


if __name__ == "__main__":
    main()
