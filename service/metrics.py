"""What an instance counts, in Prometheus text format (0.0.4), served on its own
listener (PAYCORE_METRICS_LISTEN), never on the public one.

A registry: each component registers the families it owns, with their
labels, and is handed the plain lists it counts in; this module knows none
of them. A request costs two clock reads and a few increments of plain
numbers in lists: no locks, no labels, no text. Those are produced when
Prometheus scrapes, and gauges (queue depth, requests in flight, journal
backlog, connections) are read then from the objects that own them.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import product
from time import perf_counter

from . import responses

HIGHEST_STATUS = 599
# Every answer starts "HTTP/1.1 NNN": the status digits are at 9, 10 and 11.
STATUS_DIGITS_OFFSET = ord("0") * 111

# Sub-millisecond answers are the norm (README, Performance): most buckets are there.
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

EXPOSITION_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
KINDS = ("counter", "gauge")

Number = int | float
# A family's sample lines, appended to the text being rendered.
SampleWriter = Callable[[list[str]], None]


class LatencyHistogram:
    """Seconds as floats from time.perf_counter(): in CPython cheaper to subtract
    and compare than nanosecond ints, which outgrow a machine word."""

    __slots__ = ("bounds_s", "bucket_counts", "sum_s")

    def __init__(self, bounds_s: tuple[float, ...]) -> None:
        self.bounds_s = bounds_s
        # Per bucket, not cumulative; the last one is +Inf.
        self.bucket_counts = [0] * (len(bounds_s) + 1)
        self.sum_s = 0.0

    def observe_since(self, started_at: float) -> None:
        elapsed_s = perf_counter() - started_at
        self.bucket_counts[bisect_left(self.bounds_s, elapsed_s)] += 1
        self.sum_s += elapsed_s


class Metrics:
    """One instance's families, registered and counted in by the components
    that own them. A family name is registered once: a second registration
    is a ValueError."""

    def __init__(self) -> None:
        # name -> what writes the family (HELP, TYPE, samples), in registration order.
        self._families: dict[str, SampleWriter] = {}
        # Answers by route label (registered by the handlers, route()) and status: [route][status].
        self._route_labels: dict[str, int] = {}
        self._route_meanings: dict[str, str] = {}
        self._responses: list[list[int]] = []
        self.latency = LatencyHistogram(LATENCY_BUCKETS_S)
        # Any handler's answer to a path it does not serve.
        self.unserved = self.route("other", "a path nobody serves")
        self._register("paycore_http_requests_total", "counter", self._requests_help, self._write_responses)
        self._register("paycore_http_request_duration_seconds", "histogram",
                       lambda: "From a request's first byte read to its answer written, which waits for "
                               "the journal to hold what the answer promises; routed requests only.",
                       self._write_latency)

    # --- registering -------------------------------------------------------------------

    def route(self, label: str, meaning: str = "") -> int:
        """The index to count a route's answers under (responded()). Handlers
        that answer for the same route share it; its meaning, for the HELP
        text, is given by one of them."""
        index = self._route_labels.get(label)
        if index is None:
            _label_text("route", label)
            index = self._route_labels[label] = len(self._responses)
            self._responses.append([0] * (HIGHEST_STATUS + 1))
        if meaning and self._route_meanings.setdefault(label, meaning) != meaning:
            raise ValueError(f"route {label!r} already means {self._route_meanings[label]!r}")
        return index

    def counter_family(self, name: str, help_text: str, labels: Mapping[str, Sequence[str]]) -> list:
        """Counters for every combination of the labels' values, as nested
        lists of ints indexed by the values' positions, in the labels' order
        (one label: list[int]; two: list[list[int]])."""
        if not labels:
            raise ValueError(f"{name}: a counter family needs at least one label")
        label_texts = [[_label_text(label, value) for value in values] for label, values in labels.items()]
        counts = _zeros([len(values) for values in label_texts])

        def write(text: list[str]) -> None:
            # product() walks the combinations in the order _leaves() walks the lists.
            for series_labels, count in zip(product(*label_texts), _leaves(counts)):
                text.append(f"{name}{{{','.join(series_labels)}}} {count}\n")

        self._register(name, "counter", lambda: help_text, write)
        return counts

    def register_gauge(self, name: str, kind: str, help_text: str, read: Callable[[], Number]) -> None:
        """One unlabelled value read at each scrape from the object that keeps
        it: a gauge, or a counter kept by its owner."""
        _check_kind(name, kind)
        self._register(name, kind, lambda: help_text, lambda text: text.append(f"{name} {read()}\n"))

    def register_gauges(self, name: str, kind: str, help_text: str, label: str,
                        read: Callable[[], Iterable[tuple[str, Number]]]) -> None:
        """Values by one label, read at each scrape as (label value, value) pairs."""
        _check_kind(name, kind)
        _label_text(label, "")  # the label's name checked now, not at the first scrape

        def write(text: list[str]) -> None:
            for label_value, value in read():
                text.append(f"{name}{{{_label_text(label, label_value)}}} {value}\n")

        self._register(name, kind, lambda: help_text, write)

    def _register(self, name: str, kind: str, help_text: Callable[[], str], write: SampleWriter) -> None:
        if not NAME.fullmatch(name):
            raise ValueError(f"not a metric name: {name!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        if name in self._families:
            raise ValueError(f"metric family {name} registered twice")

        def write_family(text: list[str]) -> None:
            text.append(f"# HELP {name} {help_text()}\n# TYPE {name} {kind}\n")
            write(text)

        self._families[name] = write_family

    # --- counting (the request path) ------------------------------------------------------

    def responded(self, route: int, response: bytes) -> None:
        self._responses[route][
            response[9] * 100 + response[10] * 10 + response[11] - STATUS_DIGITS_OFFSET] += 1

    # --- rendering ----------------------------------------------------------------------

    def render(self) -> bytes:
        text: list[str] = []
        for write_family in self._families.values():
            write_family(text)
        return "".join(text).encode()

    def _requests_help(self) -> str:
        meanings = "".join(f"; '{label}': {meaning}" for label, meaning in self._route_meanings.items())
        return f"Requests answered, by route and status, on every listener{meanings}."

    def _write_responses(self, text: list[str]) -> None:
        for label, route in self._route_labels.items():
            label_text = _label_text("route", label)
            for status, count in enumerate(self._responses[route]):
                if count:
                    text.append(f'paycore_http_requests_total{{{label_text},status="{status}"}} {count}\n')

    def _write_latency(self, text: list[str]) -> None:
        name = "paycore_http_request_duration_seconds"
        histogram = self.latency
        cumulative = 0
        for bound, count in zip((*histogram.bounds_s, "+Inf"), histogram.bucket_counts):
            cumulative += count
            text.append(f'{name}_bucket{{le="{bound}"}} {cumulative}\n')
        text.append(f"{name}_sum {histogram.sum_s}\n{name}_count {cumulative}\n")


def _check_kind(name: str, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")


def _zeros(sizes: list[int]) -> list:
    if len(sizes) == 1:
        return [0] * sizes[0]
    return [_zeros(sizes[1:]) for _ in range(sizes[0])]


def _leaves(counts: list) -> Iterator[int]:
    for item in counts:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


def _label_text(label: str, value: str) -> str:
    """label="value", escaped as the text format wants."""
    if not LABEL_NAME.fullmatch(label) or label.startswith("__") or label == "le":
        raise ValueError(f"not a label name: {label!r}")
    escaped = value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return f'{label}="{escaped}"'


class MetricsEndpoint:
    """The metrics listener's handler: GET /metrics, and nothing else."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._served = metrics.route("/metrics")

    def handle(self, method: bytes, url: bytes, body: bytes, authorization: bytes) -> bytes:
        if method == b"GET" and url.partition(b"?")[0] == b"/metrics":
            route = self._served
            response = responses.http_response(
                200, self._metrics.render(), content_type=EXPOSITION_CONTENT_TYPE)
        else:
            route = self._metrics.unserved
            response = responses.NOT_FOUND
        self._metrics.responded(route, response)
        return response
