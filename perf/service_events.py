"""What the instances did while a benchmark ran, for the chart to mark beside
the latency: each instance's metrics endpoint scraped about once a second,
from outside the stack, and turned into per-second series summed over the
instances (route changes, garbage collections by generation, journal syncs,
unknown outcomes, the queue's depth, which shows backlogs and their flushes).
The instances know nothing of it: they only count, as in production."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from unix_http import UnixHTTPConnection

SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0

# Counters whose increase per second the chart shows, by the series it draws
# them in: (metric name, label text or "" for every series of the name).
RATES = {
    "journal syncs": ("paycore_journal_batches_total", ""),
    "gc generation 0": ("paycore_gc_collections_total", 'generation="0"'),
    "gc generation 1": ("paycore_gc_collections_total", 'generation="1"'),
    "gc generation 2": ("paycore_gc_collections_total", 'generation="2"'),
    "unknown outcomes": ("paycore_processor_outcomes_total", 'outcome="timeout"'),
    "to default": ("paycore_route_changes_total", 'to="default"'),
    "to fallback": ("paycore_route_changes_total", 'to="fallback"'),
    "to none": ("paycore_route_changes_total", 'to="none"'),
}
GAUGES = {"queue depth": "paycore_queue_depth"}


def parse_exposition(text: str) -> dict[str, float]:
    """'name{labels}' (or 'name') -> value, for every sample line."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def _total(samples: dict[str, float], name: str, labels: str) -> float:
    return sum(value for series, value in samples.items()
               if series.partition("{")[0] == name and labels in series)


@dataclass
class Scrape:
    at_ms: int
    samples: dict[str, float]  # summed over the instances that answered


@dataclass
class ServiceEvents:
    scrapes: list[Scrape] = field(default_factory=list)
    failed_scrapes: int = 0

    def series(self, origin_ms: int) -> dict[str, list[tuple[float, float]]]:
        """Per series: (seconds since origin_ms, increase per second since the
        previous scrape) for rates, (seconds, value) for gauges."""
        out: dict[str, list[tuple[float, float]]] = {name: [] for name in (*RATES, *GAUGES)}
        for previous, scrape in zip(self.scrapes, self.scrapes[1:]):
            at_s = (scrape.at_ms - origin_ms) / 1000
            elapsed_s = max((scrape.at_ms - previous.at_ms) / 1000, 1e-3)
            for name, (metric, labels) in RATES.items():
                increase = _total(scrape.samples, metric, labels) - _total(previous.samples, metric, labels)
                out[name].append((at_s, max(increase, 0.0) / elapsed_s))
            for name, metric in GAUGES.items():
                out[name].append((at_s, _total(scrape.samples, metric, "")))
        return out

    def totals(self) -> dict[str, float]:
        """Each rate's increase over the whole run."""
        if len(self.scrapes) < 2:
            return {name: 0.0 for name in RATES}
        first, last = self.scrapes[0].samples, self.scrapes[-1].samples
        return {name: _total(last, metric, labels) - _total(first, metric, labels)
                for name, (metric, labels) in RATES.items()}


class MetricsSampler(threading.Thread):
    """Scrapes every instance's metrics socket each SCRAPE_INTERVAL_S until stop()."""

    def __init__(self, sockets: list[str]) -> None:
        super().__init__(name="metrics-sampler", daemon=True)
        self._sockets = sockets
        self._stopping = threading.Event()
        self.events = ServiceEvents()

    def run(self) -> None:
        while True:
            self._scrape()
            if self._stopping.wait(SCRAPE_INTERVAL_S):
                self._scrape()
                return

    def stop(self) -> ServiceEvents:
        self._stopping.set()
        self.join()
        return self.events

    def _scrape(self) -> None:
        summed: dict[str, float] = {}
        for path in self._sockets:
            connection = UnixHTTPConnection(path, SCRAPE_TIMEOUT_S)
            try:
                connection.request("GET", "/metrics")
                text = connection.getresponse().read().decode()
            except OSError:
                self.events.failed_scrapes += 1
                return  # a scrape counts only whole: partial sums would read as drops
            finally:
                connection.close()
            for series, value in parse_exposition(text).items():
                summed[series] = summed.get(series, 0.0) + value
        self.events.scrapes.append(Scrape(time.time_ns() // 1_000_000, summed))
