"""The emulator as a child process, for tests and benchmarks that want it out of their own
interpreter: it listens on a free port and is told the port through its start-up line."""
import signal
import subprocess
import sys
import threading
from types import TracebackType

LISTENING = "paycore emulator listening on"


class EmulatorProcess:
    """Starts `python -m paycore.emulator --port 0 OPTIONS...` and waits until it listens;
    `stop()` (or leaving the `with` block) ends it with SIGTERM. The child's other
    stderr lines are copied to this process's stderr."""

    def __init__(self, *options: str, host: str = "127.0.0.1", startup_timeout: float = 10.0) -> None:
        self.url = ""
        self.port = 0
        self._listening = threading.Event()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "paycore.emulator", "--host", host, "--port", "0", *options],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._watch_stderr, daemon=True).start()
        if not self._listening.wait(startup_timeout) or not self.url:
            self.stop()
            raise RuntimeError(f"the emulator did not start (exit code {self._process.returncode})")

    def _watch_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            if not self.url and line.startswith(LISTENING):
                self.url = line[len(LISTENING) :].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                self._listening.set()
            else:
                sys.stderr.write(line)
        self._listening.set()

    def kill(self) -> None:
        """End it as a crash would: SIGKILL, no time to finish anything."""
        self._process.kill()
        self._process.wait()

    def stop(self, timeout: float = 5.0) -> int:
        """End the emulator and return its exit code (killed if SIGTERM is not enough)."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
