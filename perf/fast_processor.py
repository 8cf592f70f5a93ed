"""The C payment-processor emulator (perf/processor.c) as a child process: it
listens on a free port and says which in its start-up line, as the Python
emulator does (paycore/emulator/process.py)."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from paycore.stack import _stop, _stop_with_parent

LISTENING = "paycore emulator listening on"


class FastProcessor:
    """Starts `processor --host HOST --port 0 OPTIONS...` and waits for its
    start-up line; stop() (or leaving the with block) ends it with SIGTERM."""

    def __init__(self, binary: Path, *options: str, host: str = "127.0.0.1") -> None:
        self.process = subprocess.Popen([str(binary), "--host", host, "--port", "0", *options],
                                        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True, preexec_fn=_stop_with_parent)
        line = self.process.stderr.readline()
        if not line.startswith(LISTENING):
            self.stop()
            raise RuntimeError(f"the processor did not start ({line.strip() or 'no output'}, "
                               f"exit code {self.process.returncode})")
        self.url = line[len(LISTENING):].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        returncode = _stop(self.process, signal.SIGTERM)
        self.process.stderr.close()
        return returncode

    def __enter__(self) -> FastProcessor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
