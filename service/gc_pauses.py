"""The garbage collector's pauses, timed through gc.callbacks: how often each
generation ran and how long it held the event loop, longest included, in the
thread's CPU time (time the host gave to other processes meanwhile is not the
collector's).

The instance freezes what it built at start (app.py), so a collection looks
only at what was allocated since; these figures show what that leaves.
"""
from __future__ import annotations

import gc
from time import thread_time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import Metrics

GENERATIONS = ("0", "1", "2")


class GcPauses:
    def __init__(self) -> None:
        self.collections = [0] * len(GENERATIONS)
        self.seconds = [0.0] * len(GENERATIONS)
        self.longest_s = [0.0] * len(GENERATIONS)
        self._started_at = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._observe)

    def stop(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = thread_time()
            return
        elapsed_s = thread_time() - self._started_at
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += elapsed_s
        if elapsed_s > self.longest_s[generation]:
            self.longest_s[generation] = elapsed_s

    def register_metrics(self, metrics: Metrics) -> None:
        metrics.register_gauges(
            "paycore_gc_collections_total", "counter",
            "Garbage collections since start, by the oldest generation collected.", "generation",
            lambda: zip(GENERATIONS, self.collections))
        metrics.register_gauges(
            "paycore_gc_pause_seconds_total", "counter",
            "CPU time the garbage collector held the event loop for, by generation.", "generation",
            lambda: zip(GENERATIONS, self.seconds))
        metrics.register_gauges(
            "paycore_gc_pause_longest_seconds", "gauge",
            "The longest single collection since start, by generation.", "generation",
            lambda: zip(GENERATIONS, self.longest_s))
