"""The emulator as a child process, for tests and benchmarks that want it out of their own
interpreter: it listens on a port the OS picks and announces it (paycore.ready)."""
import signal
import subprocess
import sys
from types import TracebackType

from paycore.ready import start_listening


class EmulatorProcess:
    """Starts `python -m paycore.emulator --port 0 OPTIONS...` and waits until it listens;
    `stop()` (or leaving the `with` block) ends it with SIGTERM. Its output goes to this
    process's."""

    def __init__(self, *options: str, host: str = "127.0.0.1", startup_timeout: float = 10.0) -> None:
        self._process, (address,) = start_listening(
            [sys.executable, "-m", "paycore.emulator", "--host", host, "--port", "0", *options],
            startup_timeout, stdin=subprocess.DEVNULL)
        self.port = int(address.rsplit(":", 1)[1])
        self.url = f"http://{address}"

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
