# make run: the whole local stack in the foreground, resuming the state kept in
# $PAYCORE_RUN_DIR (run/); make run-clean: the same from nothing.  make test: the test suite.
# Both install what they need on a fresh Debian machine with Python and a C compiler.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.core-built
CORE_SOURCES := $(wildcard pyx/*.pyx pyx/*.pxd) setup.py

BENCH_DEPS := $(VENV)/.bench-deps-installed

.PHONY: run run-clean test build build-deps system-deps clean bench bench-compare bench-calibrate flamegraph bench-capacity soak bench-loop bench-threads bench-summary bench-recent

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(PY) pyproject.toml | build-deps
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "cython>=3.0" "setuptools>=68" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

$(BUILT): $(DEPS) $(CORE_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

# SQLite's headers: the payments record's reader (pyx/record_reader.pyx) calls its C API.
build-deps:
	@test -f /usr/include/sqlite3.h || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libsqlite3-dev >/dev/null; }

build: $(BUILT)

# docker-compose checks the compose file in the tests; clang, with its
# libFuzzer and AddressSanitizer runtimes, builds the body parser for fuzzing;
# redis-server runs the Redis store in the tests (and `PAYCORE_STORE=redis
# make run`); curl is one of the HTTP clients the tests use. Installed once,
# as root or through sudo.
system-deps:
	@command -v docker-compose >/dev/null && command -v clang >/dev/null && command -v redis-server >/dev/null \
	  && command -v curl >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq docker-compose clang libclang-rt-dev redis-server curl >/dev/null; }

run: build system-deps
	$(PY) -m paycore.stack

run-clean: build system-deps
	$(PY) -m paycore.stack --clean

test: build system-deps
	$(PY) -m pytest

$(BENCH_DEPS): $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $@

# The final round of SPEC §4 (BENCH_SECONDS=300 by default) under the compose file's limits.
bench: build system-deps $(BENCH_DEPS)
	$(PY) perf/bench.py

# Full rounds alternating with another commit's (COMPARE_REF, COMPARE_PAIRS rounds each), and their ratios.
bench-compare: build system-deps $(BENCH_DEPS)
	$(PY) perf/compare.py

# The load generator against a constant-response server: its own latency floor.
bench-calibrate: $(BENCH_DEPS)
	$(PY) perf/bench.py --calibrate

# A benchmark run with py-spy flamegraphs of both instances in perf/flamegraphs/.
flamegraph: build system-deps $(BENCH_DEPS)
	BENCH_FLAMEGRAPH=1 $(PY) perf/bench.py

# Open-loop arrival rates up to saturation under the compose limits (CAPACITY_SECONDS per rate).
bench-capacity: build $(BENCH_DEPS)
	$(PY) perf/capacity.py

# The event loop's turns while a backlog drains, beside an idle loop's (LOOP_RUNS rounds).
bench-loop: build $(BENCH_DEPS)
	$(PY) perf/loop_turns.py

# CPU, context switches and migrations per payment, thread by thread (THREADS_RATE, THREADS_SECONDS).
bench-threads: build $(BENCH_DEPS)
	$(PY) perf/thread_costs.py

# GET /payments-summary of the checker's window and the last hour, every 20 ms in turn, beside 600 posts/s (SUMMARY_SECONDS, 30).
bench-summary: build $(BENCH_DEPS)
	$(PY) perf/bench_summary.py --seconds $(or $(SUMMARY_SECONDS),30)

# The recent ledger against the record's statement, in one process, over an hour at RECENT_RATE (600/s).
bench-recent: build
	$(PY) perf/bench_recent_ledger.py

# SOAK_PAYMENTS (default 10 M) at the highest rate the stack sustains, then a SIGKILLed instance's recovery.
soak: build $(BENCH_DEPS)
	$(PY) perf/soak.py

clean:
	rm -rf build $(VENV) paycore/core/*.so pyx/*.c *.egg-info
