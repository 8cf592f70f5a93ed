"""How a benchmark stops: Ctrl-C and SIGTERM (make's, or kill's) alike."""
from __future__ import annotations

import signal


def stop_on_first_signal() -> None:
    """The first SIGINT or SIGTERM raises KeyboardInterrupt, so the run's
    clean-up (its stack, its tmpfs directories, its cgroups) runs as on
    Ctrl-C; later ones are ignored, so that stopping what the run started is
    not cut short. Python's own SIGTERM ends the process with no clean-up."""
    def interrupt(signum, frame) -> None:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, interrupt)
