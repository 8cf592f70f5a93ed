"""The load generator (perf/loadgen.c) at a constant arrival rate, k6's
constant-arrival-rate, with its progress lines read while it runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from paycore.stack import _stop_with_parent

PROGRESS_MS = 1000


def refusals(answers: list[dict]) -> dict[str, int]:
    """Answers other than 2xx as "<status> <why>": the "error" of a JSON body, or the body."""
    counted: dict[str, int] = {}
    for answer in answers:
        try:
            why = json.loads(answer["body"]).get("error", answer["body"])
        except (ValueError, AttributeError):
            why = answer["body"]
        key = f"{answer['status']} {why}".strip()
        counted[key] = counted.get(key, 0) + answer["count"]
    return counted


class OpenLoopLoad:
    """Starts the generator at once: `rate` fresh payments per second for `seconds`
    (after `warmup_s` unrecorded ones), on up to `max_vus` connections
    (`pre_allocated` of them in the pool from the start)."""

    def __init__(self, loadgen: Path, port: int, rate: float, seconds: float, max_vus: int,
                 pre_allocated: int, out: Path = Path(os.devnull), warmup_s: float = 0) -> None:
        self.progress: list[dict] = []
        self.summary: dict | None = None
        self.process = subprocess.Popen(
            [str(loadgen), "--target", f"127.0.0.1:{port}", "--rate", f"{rate:g}", "--duration", f"{seconds:g}",
             "--max-vus", str(max_vus), "--start-vus", str(min(pre_allocated, max_vus)),
             "--progress-ms", str(PROGRESS_MS), "--out", str(out),
             *(["--warmup", f"{warmup_s:g}"] if warmup_s > 0 else [])],
            stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_stop_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            report = json.loads(line)
            if report.get("progress"):
                self.progress.append(report)
            else:
                self.summary = report

    def latest(self) -> dict | None:
        """The running totals last reported (the final summary once the run is over)."""
        return self.summary or (self.progress[-1] if self.progress else None)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """No more iterations start; those in flight finish (the generator reports as usual)."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> dict:
        self.process.wait()
        self._reader.join()
        if self.process.returncode != 0 or self.summary is None:
            raise RuntimeError(f"the load generator failed (exit code {self.process.returncode})")
        return self.summary
