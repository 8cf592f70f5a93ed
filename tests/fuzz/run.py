"""Run a fuzz target: python tests/fuzz/run.py body|request [libFuzzer options] [corpus dirs]

The payment parser is compiled C, which libFuzzer sees no coverage of unless
it is compiled with clang's coverage instrumentation; AddressSanitizer comes
along to catch reads past the body. So this builds, under build/fuzz/ (again
only when a source changed), the parser with both and a library holding
libFuzzer and AddressSanitizer that is preloaded into Python (atheris's wheels
ship no such library). The request target fuzzes Python code, which atheris
instruments by itself, and runs as it is.

Fuzz for five minutes, keeping what is found outside the repo:
    python tests/fuzz/run.py body -max_total_time=300 /tmp/body tests/fuzz/corpus/body
Then keep in the repo only what adds coverage:
    python tests/fuzz/run.py body -merge=1 tests/fuzz/corpus/body /tmp/body
Replay one input (a crash file, say):
    python tests/fuzz/run.py body crash-1234
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parents[1]
BUILD = REPO / "build" / "fuzz"
TARGETS = ("body", "request")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TARGETS:
        sys.exit(__doc__)
    target, *fuzzer_args = argv
    # libFuzzer runs the target script itself for -merge and -fork: its
    # "#!/usr/bin/env python3" must find this interpreter.
    environment = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if target == "body":
        environment.update(native_parser_environment())
    command = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"),
               f"-dict={FUZZ_DIR / target}.dict", *fuzzer_args]
    os.execve(sys.executable, command, environment)


def native_parser_environment() -> dict[str, str]:
    BUILD.mkdir(parents=True, exist_ok=True)
    return {
        "LD_PRELOAD": str(build_sanitizer_runtime()),
        "PAYCORE_FUZZ_PARSER": str(build_parser()),
        # With Python's own allocator a read past a bytes object lands in
        # the allocator's arena, where AddressSanitizer cannot see it.
        "PYTHONMALLOC": "malloc",
        # The interpreter's objects alive at exit are not leaks of the code
        # under test; a small quarantine keeps memory flat over long runs.
        "ASAN_OPTIONS": "detect_leaks=0:quarantine_size_mb=64",
    }


def build_parser() -> Path:
    """paycore.core.payment_parser from the C that setup.py generated, with coverage and ASan."""
    source = REPO / "pyx" / "payment_parser.c"
    built = BUILD / ("payment_parser" + sysconfig.get_config_var("EXT_SUFFIX"))
    if is_stale(built, [source]):
        subprocess.run(
            ["clang", "-O1", "-g", "-fno-omit-frame-pointer", "-fPIC", "-shared",
             "-fsanitize=address,fuzzer-no-link", f"-I{sysconfig.get_paths()['include']}",
             str(source), "-o", str(built)],
            check=True)
    return built


def build_sanitizer_runtime() -> Path:
    """libFuzzer and AddressSanitizer as one library to preload (LD_PRELOAD)."""
    asan, asan_cxx, libfuzzer = (clang_runtime(name) for name in ("asan", "asan_cxx", "fuzzer_no_main"))
    built = BUILD / "asan_with_fuzzer.so"
    if is_stale(built, [asan, asan_cxx, libfuzzer]):
        with tempfile.TemporaryDirectory() as objects:
            subprocess.run(["ar", "x", str(asan)], cwd=objects, check=True)
            # Only an executable may have the .preinit_array this object adds;
            # being preloaded starts AddressSanitizer early enough.
            for preinit in Path(objects).glob("asan_preinit*.o"):
                preinit.unlink()
            subprocess.run(
                ["clang++", "-shared", "-o", str(built), *map(str, sorted(Path(objects).glob("*.o"))),
                 "-Wl,--whole-archive", str(asan_cxx), str(libfuzzer), "-Wl,--no-whole-archive"],
                check=True)
    return built


def clang_runtime(name: str) -> Path:
    runtime_dir = subprocess.run(["clang", "--print-runtime-dir"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    return Path(runtime_dir) / f"libclang_rt.{name}-{platform.machine()}.a"


def is_stale(built: Path, sources: list[Path]) -> bool:
    return not built.exists() or any(source.stat().st_mtime > built.stat().st_mtime for source in sources)


if __name__ == "__main__":
    main(sys.argv[1:])
