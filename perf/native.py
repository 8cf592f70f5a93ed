"""The benchmarks' C tools (perf/*.c), compiled into build/ when their source
or a shared header is newer than the binary."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
TOOLS = ("loadgen", "constant_server", "processor")


def build_tools() -> dict[str, Path]:
    BUILD.mkdir(exist_ok=True)
    tools = {}
    headers = list((REPO / "perf").glob("*.h"))
    for name in TOOLS:
        source, binary = REPO / "perf" / f"{name}.c", BUILD / name
        newest_input = max(path.stat().st_mtime for path in (source, *headers))
        if not binary.exists() or binary.stat().st_mtime < newest_input:
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)], check=True)
        tools[name] = binary
    return tools
