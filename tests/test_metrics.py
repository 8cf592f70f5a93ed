"""Prometheus metrics: the exposition format, the registry and who registers
what, what the components count, the numbers of a real stack adding up, and
nothing internal reachable through the load balancer's public port."""
from __future__ import annotations

import ast
import asyncio
import re
import socket
import time
from pathlib import Path

import pytest
import yaml
from conftest import UnixHTTPConnection, call, quick_stack, random_uuid
from paycore.service.accept import PaymentIntake
from paycore.service.admin import AdminToken
from paycore.service.app import Instance
from paycore.service.config import Settings
from paycore.service.connections import ConnectionGuard, ConnectionLimits
from paycore.service.delivery import Dispatcher, wall_clock_ms
from paycore.service.http_server import HttpProtocol
from paycore.service.lookup import PaymentLookup
from paycore.service.metrics import Metrics, MetricsEndpoint
from paycore.service.payment import Attempt, Payment
from paycore.service.processor_client import Outcome
from paycore.service.router import Router
from paycore.service.routes import Routes
from paycore.service.store.base import Acceptance
from paycore.service.store.embedded.store import EmbeddedStore
from paycore.service.summary import Summary
from test_compose import instances
from test_service import payment, post_many

from paycore.core.ring_queue import RingQueue

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "service"

# --- the exposition format (0.0.4), strictly -------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_VALUE = r'(?:[^"\\\n]|\\[\\"n])*'  # the only escapes: \\, \" and \n
COMMENT = re.compile(rf"# (HELP|TYPE) ({NAME}) (.+)")
SAMPLE = re.compile(rf'({NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="{LABEL_VALUE}",?)*)\}})? (\S+)')
LABEL = re.compile(rf'([a-zA-Z_][a-zA-Z0-9_]*)="({LABEL_VALUE})"')
UNESCAPED = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Series = tuple[str, frozenset[tuple[str, str]]]


def parse_labels(labels: str) -> frozenset[tuple[str, str]]:
    return frozenset((name, re.sub(r"\\.", lambda escape: UNESCAPED[escape.group()], text))
                     for name, text in LABEL.findall(labels))


def parse_exposition(text: str) -> dict[Series, float]:
    """Every line a HELP, a TYPE or a sample of a family typed before it;
    counters end in _total; histogram buckets are cumulative up to +Inf, which
    equals _count; no series twice."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[Series, float] = {}
    for line in text.splitlines():
        comment = COMMENT.fullmatch(line)
        if comment:
            kind, name, rest = comment.groups()
            if kind == "HELP":
                assert name not in helped, f"HELP twice for {name}"
                helped.add(name)
            else:
                assert name not in types, f"TYPE twice for {name}"
                assert rest in ("counter", "gauge", "histogram"), line
                assert rest != "counter" or name.endswith("_total"), f"counter without _total: {name}"
                types[name] = rest
            continue
        sample = SAMPLE.fullmatch(line)
        assert sample, f"not a sample line: {line!r}"
        name, labels, value = sample.groups()
        family = name if name in types else next(
            (name.removesuffix(suffix) for suffix in HISTOGRAM_SUFFIXES
             if name.endswith(suffix) and types.get(name.removesuffix(suffix)) == "histogram"), None)
        assert family is not None, f"sample before its TYPE: {line!r}"
        series = (name, parse_labels(labels or ""))
        assert series not in samples, f"series twice: {line!r}"
        samples[series] = float(value)
    assert helped == set(types), "every family has HELP and TYPE"
    for family, kind in types.items():
        if kind == "histogram":
            buckets = sorted((float(dict(labels)["le"]), value)
                             for (name, labels), value in samples.items() if name == family + "_bucket")
            counts = [value for _, value in buckets]
            assert counts == sorted(counts), f"{family} buckets not cumulative"
            assert buckets[-1][0] == float("inf")
            assert buckets[-1][1] == samples[(family + "_count", frozenset())]
    return samples


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The sum over every series of name whose labels include these."""
    wanted = set(labels.items())
    return sum(sample for (series_name, series_labels), sample in samples.items()
               if series_name == name and wanted <= series_labels)


def scrape_endpoint(endpoint: MetricsEndpoint) -> tuple[str, dict[Series, float]]:
    """The text a GET /metrics answers, and its samples."""
    head, _, body = endpoint.handle(b"GET", b"/metrics", b"", b"").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
    return body.decode(), parse_exposition(body.decode())


def family_names(text: str) -> set[str]:
    return set(re.findall(rf"^# TYPE ({NAME}) ", text, re.MULTILINE))


REQUEST_FAMILIES = {"paycore_http_requests_total", "paycore_http_request_duration_seconds"}
INSTANCE_FAMILIES = REQUEST_FAMILIES | {
    "paycore_queue_depth", "paycore_open_connections", "paycore_refused_connections_total",
    "paycore_processor_outcomes_total", "paycore_payment_retries_total", "paycore_payments_in_flight",
    "paycore_payments_unresolved", "paycore_routing_decisions_total", "paycore_route_changes_total",
    "paycore_processor_requests_in_flight", "paycore_gc_collections_total", "paycore_gc_pause_seconds_total",
    "paycore_gc_pause_longest_seconds",
}
EMBEDDED_STORE_FAMILIES = {
    "paycore_journal_backlog_records", "paycore_journal_batches_total", "paycore_journal_records_total",
    "paycore_journal_uncommitted_records", "paycore_journal_write_errno",
    "paycore_accepted_ids_live", "paycore_accepted_ids_window_seconds",
    "paycore_accepted_ids_early_advances_total", "paycore_ledger_tail_entries", "paycore_ledger_tail_room",
}


# --- the registry --------------------------------------------------------------

def relative_imports(path: Path) -> set[str]:
    """The service modules a module imports, as paths relative to service/ without .py."""
    package = path.parent.relative_to(SERVICE).parts
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            module = (*base, *node.module.split(".")) if node.module else base
            imported.update("/".join((*module, alias.name)) if not node.module else "/".join(module)
                            for alias in node.names)
    return imported


def test_metrics_imports_none_of_the_modules_that_report_to_it():
    users = {str(path.relative_to(SERVICE).with_suffix("")) for path in SERVICE.rglob("*.py")
             if "metrics" in relative_imports(path) and path.name != "metrics.py"}
    # The owners of the families, each registering its own.
    assert {"app", "routes", "http_server", "delivery", "router", "connections",
            "store/embedded/store", "store/embedded/journal"} <= users
    assert relative_imports(SERVICE / "metrics.py") == {"responses"}
    assert not users & relative_imports(SERVICE / "metrics.py")


def test_a_family_is_registered_once():
    metrics = Metrics()
    Router(1500, metrics)
    with pytest.raises(ValueError, match="paycore_routing_decisions_total registered twice"):
        Router(1500, metrics)
    guard = ConnectionGuard(ConnectionLimits(16, 1024, 1024, 1000, 1000))
    guard.register_metrics(metrics)
    with pytest.raises(ValueError, match="registered twice"):
        guard.register_metrics(metrics)
    metrics.register_gauge("a_gauge", "gauge", "a", lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        metrics.register_gauges("a_gauge", "gauge", "b", "kind", lambda: ())
    with pytest.raises(ValueError, match="registered twice"):
        metrics.register_gauge("paycore_http_requests_total", "counter", "c", lambda: 1)
    text, _ = scrape_endpoint(MetricsEndpoint(metrics))
    assert text.count("# TYPE a_gauge ") == 1 and "a_gauge 1\n" in text


@pytest.mark.parametrize("register", [
    lambda metrics: metrics.register_gauge("answers", "counter", "a counter needs _total", lambda: 1),
    lambda metrics: metrics.register_gauge("latency_seconds", "histogram", "not a gauge", lambda: 1),
    lambda metrics: metrics.register_gauge("2xx", "gauge", "not a name", lambda: 1),
    lambda metrics: metrics.register_gauge("a-b", "gauge", "not a name", lambda: 1),
    lambda metrics: metrics.register_gauges("by_bucket", "gauge", "reserved label", "le", lambda: ()),
    lambda metrics: metrics.register_gauges("by_x", "gauge", "reserved label", "__x", lambda: ()),
    lambda metrics: metrics.counter_family("unlabelled_total", "needs a label", {}),
    lambda metrics: metrics.counter_family("by_total", "not a label", {"a b": ("x",)}),
])
def test_names_kinds_and_labels_are_checked_when_registered(register):
    metrics = Metrics()
    with pytest.raises(ValueError):
        register(metrics)
    text, _ = scrape_endpoint(MetricsEndpoint(metrics))
    assert family_names(text) == REQUEST_FAMILIES  # nothing half registered


def test_counter_families_count_in_the_lists_they_hand_out():
    metrics = Metrics()
    by_kind = metrics.counter_family("things_total", "Things.", {"kind": ("a", "b")})
    by_pair = metrics.counter_family("pairs_total", "Pairs.", {"x": ("1", "2"), "y": ("p", "q", "r")})
    by_kind[1] += 2
    by_pair[1][2] += 5
    by_pair[0][1] += 1
    _, samples = scrape_endpoint(MetricsEndpoint(metrics))
    assert value(samples, "things_total", kind="a") == 0
    assert value(samples, "things_total", kind="b") == 2
    assert value(samples, "pairs_total", x="2", y="r") == 5
    assert value(samples, "pairs_total", x="1", y="q") == 1
    assert total(samples, "pairs_total") == 6
    assert len([series for series in samples if series[0] == "pairs_total"]) == 6


def test_gauges_are_read_at_each_scrape_and_label_values_escaped():
    metrics = Metrics()
    held = {"plain": 1, 'quote " back \\ slash\nnewline': 2}
    metrics.register_gauges("held_things", "gauge", "Things held.", "thing", lambda: held.items())
    endpoint = MetricsEndpoint(metrics)
    _, samples = scrape_endpoint(endpoint)
    assert value(samples, "held_things", thing='quote " back \\ slash\nnewline') == 2
    held["plain"] = 7
    _, samples = scrape_endpoint(endpoint)
    assert value(samples, "held_things", thing="plain") == 7


def test_a_route_label_is_shared_by_its_handlers_and_means_one_thing():
    metrics = Metrics()
    assert metrics.route("/x", "one thing") == metrics.route("/x") == metrics.route("/x", "one thing")
    with pytest.raises(ValueError, match="already means"):
        metrics.route("/x", "another thing")
    text, _ = scrape_endpoint(MetricsEndpoint(metrics))
    assert "'/x': one thing" in text


# --- components counting, in one process -----------------------------------

class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class ScriptedClient:
    """A processor that answers the outcomes given, in order, and holds nothing."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)

    async def send_payment(self, uuid16: bytes, cents: int, requested_at_ms: int) -> Outcome:
        return self.outcomes.pop(0)

    async def find_payment(self, uuid16: bytes) -> None:
        return None


TAIL_CAPACITY = 64


class Parts:
    """The components that count, around an embedded store in a directory of
    its own and the given processor clients."""

    def __init__(self, directory: Path, clients: tuple[ScriptedClient, ScriptedClient]) -> None:
        self.metrics = Metrics()
        settings = Settings(instance="1", shared_dir=str(directory / "shared"),
                            data_dir=str(directory / "data"), idempotency_capacity=1024,
                            ledger_tail_capacity=TAIL_CAPACITY, metrics_listen="")
        self.store = EmbeddedStore(settings)
        self.queue = RingQueue(16)
        self.router = Router(1500, self.metrics)
        self.dispatcher = Dispatcher(self.queue, self.router, clients, self.store, self.metrics,
                                     max_in_flight=4, retry_min_ms=5, retry_max_ms=20, pin_release_ms=1000)
        self.connections = ConnectionGuard(ConnectionLimits(16, 1024, 1024, 1000, 1000))
        self.connections.register_metrics(self.metrics)
        self.routes = Routes(PaymentIntake(self.store), Summary(self.store), PaymentLookup(self.store),
                             self.store, self.metrics, AdminToken(""))
        self.endpoint = MetricsEndpoint(self.metrics)

    async def start(self) -> None:
        await self.store.start(self.queue, self.dispatcher)
        self.store.register_metrics(self.metrics)
        self.journal = self.store.journal

    def connect(self, handler) -> tuple[HttpProtocol, RecordingTransport]:
        protocol = HttpProtocol(handler, self.store, self.connections, self.metrics)
        transport = RecordingTransport()
        protocol.connection_made(transport)
        return protocol, transport

    def scrape(self) -> dict[Series, float]:
        return scrape_endpoint(self.endpoint)[1]

    @property
    def idle(self) -> bool:
        return not len(self.queue) and not self.dispatcher.in_flight and not self.dispatcher.unresolved


async def until(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


def run_with_parts(tmp_path: Path, scenario,
                   clients: tuple[ScriptedClient, ScriptedClient] | None = None) -> None:
    async def main() -> None:
        parts = Parts(tmp_path, clients or (ScriptedClient(), ScriptedClient()))
        await parts.start()
        try:
            await scenario(parts)
        finally:
            await parts.dispatcher.stop()
            await parts.store.close()
    asyncio.run(main())


def test_requests_are_counted_by_route_and_status_with_their_latency(tmp_path):
    async def scenario(parts: Parts) -> None:
        protocol, transport = parts.connect(parts.endpoint)
        protocol.data_received(b"GET /metrics HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n"
                               b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert transport.written.count(b"HTTP/1.1 200 OK\r\n") == 1
        assert transport.written.count(b"HTTP/1.1 404 Not Found\r\n") == 2
        public, answers = parts.connect(parts.routes)
        public.data_received(b"GET /nope HTTP/1.1\r\n\r\nPOST /purge-payments HTTP/1.1\r\n"
                             b"Content-Length: 0\r\n\r\nDELETE /payments HTTP/1.1\r\n\r\n")
        assert answers.written.count(b"HTTP/1.1 ") == 3
        broken, _ = parts.connect(parts.routes)
        broken.data_received(b"NOT HTTP\r\n\r\n")

        samples = parts.scrape()
        requests = "paycore_http_requests_total"
        assert value(samples, requests, route="/metrics", status="200") == 1
        assert value(samples, requests, route="other", status="404") == 3  # from both handlers
        assert value(samples, requests, route="/purge-payments", status="403") == 1
        assert value(samples, requests, route="/payments", status="405") == 1
        assert value(samples, requests, route="unrouted", status="400") == 1
        assert total(samples, requests) == 7
        # Routed requests only; each was answered at once, well within a second.
        assert value(samples, "paycore_http_request_duration_seconds_count") == 6
        assert value(samples, "paycore_http_request_duration_seconds_bucket", le="0.1") == 6
        assert 0 < value(samples, "paycore_http_request_duration_seconds_sum") < 1
        assert value(samples, "paycore_open_connections") == 3
        assert value(samples, "paycore_refused_connections_total") == 0
    run_with_parts(tmp_path, scenario)


def test_latency_runs_until_the_answer_is_written_after_the_journal(tmp_path):
    async def scenario(parts: Parts) -> None:
        body = payment()
        protocol, transport = parts.connect(parts.routes)
        protocol.data_received(b"POST /payments HTTP/1.1\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert transport.written == b""  # the 202 waits for the journal to hold the payment
        assert value(parts.scrape(), "paycore_journal_backlog_records") == 1
        time.sleep(0.03)  # noqa: ASYNC251 - the loop stalls, as behind a slow journal write
        await until(lambda: transport.written, "the answer never left")
        assert transport.written.startswith(b"HTTP/1.1 202 ")
        samples = parts.scrape()
        assert value(samples, "paycore_http_request_duration_seconds_bucket", le="0.025") == 0
        assert value(samples, "paycore_http_request_duration_seconds_count") == 1
        assert value(samples, "paycore_http_request_duration_seconds_sum") >= 0.03
    run_with_parts(tmp_path, scenario)


def test_outcomes_routing_and_retries_are_counted(tmp_path):
    default = ScriptedClient(Outcome.FAILED)
    fallback = ScriptedClient(Outcome.PROCESSED, Outcome.UNKNOWN, Outcome.PROCESSED, Outcome.PROCESSED)

    async def scenario(parts: Parts) -> None:
        def answered(left: int):
            return lambda: len(default.outcomes) + len(fallback.outcomes) == left and parts.idle

        parts.dispatcher.start()
        # A 5xx from the default: requeued, and the route changes to the fallback.
        parts.queue.push(random_uuid().bytes, 100)
        parts.dispatcher.notify()
        await until(answered(3), "the requeued payment was not sent again")
        # A timeout: pinned to the fallback and resent there.
        parts.queue.push(random_uuid().bytes, 200)
        parts.dispatcher.notify()
        await until(answered(1), "the pinned payment was not resent")
        # Left unsent by a previous run.
        parts.dispatcher.resume([Payment(random_uuid().bytes, 300)], [])
        await until(answered(0), "the resumed payment was not sent")

        samples = parts.scrape()
        outcomes = "paycore_processor_outcomes_total"
        assert value(samples, outcomes, processor="default", outcome="5xx") == 1
        assert value(samples, outcomes, processor="fallback", outcome="timeout") == 1
        assert value(samples, outcomes, processor="fallback", outcome="ok") == 3
        assert total(samples, outcomes) == 5
        decisions = "paycore_routing_decisions_total"
        assert value(samples, decisions, target="default") == 1
        assert value(samples, decisions, target="fallback") == 3  # the pinned resend is no decision
        assert value(samples, decisions, target="none") == 0
        assert value(samples, "paycore_route_changes_total", to="fallback") == 1
        assert total(samples, "paycore_route_changes_total") == 1
        retries = "paycore_payment_retries_total"
        assert value(samples, retries, kind="requeued") == 1
        assert value(samples, retries, kind="pinned_resend") == 1
        assert value(samples, retries, kind="resumed_unsent") == 1
        assert value(samples, retries, kind="resumed_unresolved") == 0
        for gauge in ("paycore_payments_in_flight", "paycore_payments_unresolved"):
            assert value(samples, gauge) == 0, gauge
        assert total(samples, "paycore_processor_requests_in_flight") == 0
        # The three settlements reach the payments record, which frees the tail.
        await until(lambda: value(parts.scrape(), "paycore_ledger_tail_entries") == 0,
                    "the payments record did not commit the settlements")
        assert value(parts.scrape(), "paycore_ledger_tail_room") == TAIL_CAPACITY
    run_with_parts(tmp_path, scenario, (default, fallback))


def test_the_embedded_store_reports_its_journal_ids_and_ledger_tail(tmp_path):
    async def scenario(parts: Parts) -> None:
        payments = [Payment(random_uuid().bytes, 100 * n) for n in range(1, 4)]
        assert [parts.store.accept(each) for each in payments] == [Acceptance.ACCEPTED] * 3
        samples = parts.scrape()
        assert value(samples, "paycore_accepted_ids_live") == 3
        assert value(samples, "paycore_journal_backlog_records") == 3
        assert value(samples, "paycore_journal_records_total") == 0

        await asyncio.wait_for(parts.journal.durable(), 5)
        samples = parts.scrape()
        assert value(samples, "paycore_journal_backlog_records") == 0
        assert value(samples, "paycore_journal_records_total") == 3
        assert 1 <= value(samples, "paycore_journal_batches_total") <= 3
        assert value(samples, "paycore_journal_write_errno") == 0
        # Durable, and the payments record not told yet.
        assert value(samples, "paycore_journal_uncommitted_records") == 3
        assert parts.store.accept(payments[0]) == Acceptance.DUPLICATE
        assert value(samples, "paycore_accepted_ids_live") == 3
        # The whole window, and at most the part of an epoch the oldest live one has run past it.
        window_s = value(samples, "paycore_accepted_ids_window_seconds")
        assert 3600 <= window_s <= 3600 + parts.store.ids.epoch_ms / 1000
        assert value(samples, "paycore_accepted_ids_early_advances_total") == 0

        parts.store.settle(Attempt(payments[0], 0, wall_clock_ms()))
        samples = parts.scrape()
        assert value(samples, "paycore_ledger_tail_entries") == 1
        assert value(samples, "paycore_ledger_tail_room") == TAIL_CAPACITY - 1
        await until(lambda: value(parts.scrape(), "paycore_ledger_tail_entries") == 0,
                    "the payments record did not commit the settlement")
        samples = parts.scrape()
        assert value(samples, "paycore_ledger_tail_room") == TAIL_CAPACITY
        assert value(samples, "paycore_journal_uncommitted_records") == 0
        assert value(samples, "paycore_journal_records_total") == 4
    run_with_parts(tmp_path, scenario)


def serve_instance(settings: Settings, scenario) -> None:
    async def main() -> None:
        instance = Instance(settings)
        await instance.start()
        try:
            await scenario(instance)
        finally:
            await instance.stop()
    asyncio.run(main())


def instance_settings(tmp_path: Path, **overrides) -> Settings:
    # Processors nobody listens on: nothing is sent in these tests.
    return Settings(instance="1", shared_dir=str(tmp_path / "shared"), data_dir=str(tmp_path / "data"),
                    listen=("127.0.0.1:0",), metrics_listen="", default_url="http://127.0.0.1:9",
                    fallback_url="http://127.0.0.1:9", idempotency_capacity=1024, drain_timeout_ms=0,
                    **overrides)


def test_an_instance_wires_every_family_to_its_owner(tmp_path):
    async def scenario(instance: Instance) -> None:
        instance.queue.push(random_uuid().bytes, 100)
        text, samples = scrape_endpoint(instance.metrics_endpoint)
        assert family_names(text) == INSTANCE_FAMILIES | EMBEDDED_STORE_FAMILIES
        assert value(samples, "paycore_queue_depth") == 1
        assert instance.queue.pop() is not None
        assert value(scrape_endpoint(instance.metrics_endpoint)[1], "paycore_queue_depth") == 0
    serve_instance(instance_settings(tmp_path), scenario)


def test_a_redis_store_adds_no_families(tmp_path, redis_url):
    async def scenario(instance: Instance) -> None:
        text, _ = scrape_endpoint(instance.metrics_endpoint)
        assert family_names(text) == INSTANCE_FAMILIES
    serve_instance(instance_settings(tmp_path, store=redis_url), scenario)


def test_format_checks_catch_broken_exposition():
    """The parser above fails what Prometheus would refuse or misread."""
    for broken in ("# TYPE x_total counter\n# HELP x_total h\nx_total{a=\"1\"} 1\nx_total{a=\"1\"} 2\n",
                   "# HELP x h\n# TYPE x counter\nx 1\n",
                   "x_total 1\n",
                   ("# HELP h s\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                    "h_sum 1\nh_count 1\n"),
                   "# HELP g h\n# TYPE g gauge\ng{a=1} 1\n"):
        with pytest.raises(AssertionError):
            parse_exposition(broken)


def test_the_metrics_listener_defaults_to_a_socket_per_instance_and_never_an_api_one(monkeypatch):
    monkeypatch.delenv("PAYCORE_METRICS_LISTEN", raising=False)
    monkeypatch.setenv("PAYCORE_SHARED_DIR", "/run/shared")
    monkeypatch.setenv("PAYCORE_INSTANCE", "2")
    monkeypatch.setenv("PAYCORE_LISTEN", "unix:/run/sockets/api-2.sock")
    assert Settings().metrics_listen == "unix:/run/shared/metrics-2.sock"
    monkeypatch.setenv("PAYCORE_METRICS_LISTEN", "unix:/run/sockets/api-2.sock")
    with pytest.raises(SystemExit, match="PAYCORE_METRICS_LISTEN"):
        Settings()


# --- a real stack (conftest's live: the session's stack, reset) -------------

def metrics_socket(live, index: int) -> str:
    """Where PAYCORE_METRICS_LISTEN points by default: the shared directory."""
    return str(live.stack.shared_dir / f"metrics-{index}.sock")


def scrape(live, index: int) -> dict[Series, float]:
    connection = UnixHTTPConnection(metrics_socket(live, index))
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(response.read().decode())


def scrape_when_idle(live, timeout_s: float = 10.0) -> list[dict[Series, float]]:
    """Once every instance has sent everything and holds no answer back."""
    deadline = time.monotonic() + timeout_s
    while True:
        scrapes = [scrape(live, index) for index in sorted(live.stack.instances)]
        busy = sum(total(samples, name) for samples in scrapes
                   for name in ("paycore_queue_depth", "paycore_payments_in_flight",
                                "paycore_processor_requests_in_flight", "paycore_payments_unresolved",
                                "paycore_journal_backlog_records"))
        if busy == 0 or time.monotonic() > deadline:
            return scrapes
        time.sleep(0.05)


def change(before: list[dict], after: list[dict], name: str, **labels: str) -> float:
    """How much a counter moved, over every instance."""
    return sum(total(samples, name, **labels) for samples in after) - \
        sum(total(samples, name, **labels) for samples in before)


def post(live, count: int) -> None:
    statuses = asyncio.run(post_many(live.port, [payment() for _ in range(count)]))
    assert statuses == [202] * count


def test_a_stack_counts_every_payment_once(live):
    before = scrape_when_idle(live)
    post(live, 300)
    processed = live.wait_until_processed(300)
    after = scrape_when_idle(live)

    assert change(before, after, "paycore_http_requests_total", route="/payments", status="202") == 300
    assert change(before, after, "paycore_http_requests_total", route="/payments") == 300
    for name in ("default", "fallback"):
        assert change(before, after, "paycore_processor_outcomes_total", processor=name, outcome="ok") \
            == processed[name]["totalRequests"]
    assert change(before, after, "paycore_routing_decisions_total") == 300
    assert change(before, after, "paycore_payment_retries_total") == 0
    # Accepted, sending, settled; outcomes ride along with the next batch, so
    # the last ones may still wait in the backlog.
    assert change(before, after, "paycore_journal_records_total") \
        + change(before, after, "paycore_journal_backlog_records") == 300 * 3
    for samples in after:
        routed = total(samples, "paycore_http_requests_total") - \
            total(samples, "paycore_http_requests_total", route="unrouted")
        assert value(samples, "paycore_http_request_duration_seconds_count") == routed
        for gauge in ("paycore_queue_depth", "paycore_payments_in_flight", "paycore_payments_unresolved"):
            assert value(samples, gauge) == 0, gauge
        assert total(samples, "paycore_processor_requests_in_flight") == 0


def test_a_failing_default_is_counted(live):
    before = scrape_when_idle(live)
    live.default.set_failure(True)
    post(live, 200)
    processed = live.wait_until_processed(200)
    after = scrape_when_idle(live)

    assert processed["fallback"]["totalRequests"] == 200
    ok = "paycore_processor_outcomes_total"
    assert change(before, after, ok, processor="fallback", outcome="ok") == 200
    assert change(before, after, ok, processor="default", outcome="ok") == 0
    assert change(before, after, "paycore_routing_decisions_total", target="fallback") >= 200
    assert change(before, after, "paycore_route_changes_total", to="fallback") >= 1
    # Every 5xx of the default put its payment back in the queue.
    failed = change(before, after, ok, processor="default", outcome="5xx")
    assert failed == change(before, after, "paycore_payment_retries_total", kind="requeued")
    assert change(before, after, ok) == 200 + failed


# --- nothing internal through the public port ------------------------------

def exchange(port: int, request: bytes) -> bytes:
    """One request on its own connection, read until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


INTERNAL_TARGETS = [
    "/metrics", "/metrics/", "/metrics?name[]=paycore_queue_depth", "/METRICS", "//metrics",
    "/journal", "/journal-1.log", "/shared/health.json", "/health.json",
    "/admin/payments-summary", "/admin/configurations/failure", "/payments/service-health",
    "/payments/../metrics", "/../metrics", "/%2e%2e/metrics", "/payments-summary/../../metrics",
    "/%6Detrics", "/metrics%00", "*",
]


@pytest.mark.parametrize("target", INTERNAL_TARGETS)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_internal_paths_are_not_served_through_the_load_balancer(live, method, target):
    answer = exchange(live.port, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n"
                                 "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 405 ", b"HTTP/1.1 400 ")), answer[:200]
    assert b"paycore_" not in answer and b"# TYPE" not in answer


@pytest.mark.parametrize("request_head", [
    # Absolute-form targets naming the metrics listener, as a forward proxy would take them.
    "GET http://127.0.0.1:9464/metrics HTTP/1.1\r\nHost: 127.0.0.1:9464",
    "GET http://localhost/metrics HTTP/1.1\r\nHost: localhost",
    "GET unix:{socket}/metrics HTTP/1.1\r\nHost: localhost",
    # The metrics listener's address as the Host.
    "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9464",
    "GET /metrics HTTP/1.1\r\nHost: unix:{socket}",
    "GET /metrics HTTP/1.1\r\nHost: api1:9464\r\nX-Forwarded-Host: api1:9464",
    "GET /metrics HTTP/1.0",
    # Tunnels and protocol switches.
    "CONNECT 127.0.0.1:9464 HTTP/1.1\r\nHost: 127.0.0.1:9464",
    "CONNECT {socket} HTTP/1.1\r\nHost: localhost",
    "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c",
])
def test_proxy_style_requests_do_not_reach_the_metrics(live, request_head):
    request = request_head.format(socket=metrics_socket(live, 1)) + "\r\nConnection: close\r\n\r\n"
    answer = exchange(live.port, request.encode())
    assert answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 400 ")), answer[:200]
    assert b"paycore_" not in answer and b"# TYPE" not in answer


def test_the_metrics_listener_is_not_the_public_one(live):
    for index in sorted(live.stack.instances):
        api = live.stack.socket_path(index)
        assert Path(metrics_socket(live, index)).parent != Path(api).parent
        assert call(live.instance(index), "GET", "/metrics")[0] == 404
        assert call(UnixHTTPConnection(metrics_socket(live, index)), "GET", "/payments-summary")[0] == 404
        assert call(UnixHTTPConnection(metrics_socket(live, index)), "POST", "/payments", payment())[0] == 404


def test_an_empty_metrics_listen_serves_no_metrics():
    with quick_stack(PAYCORE_METRICS_LISTEN="") as running:
        assert call(running.client(), "GET", "/payments-summary")[0] == 200
        assert not list(running.stack.shared_dir.glob("metrics-*"))


def test_compose_publishes_no_instance_port_and_balances_only_api_listeners():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    balancer = services.pop("load-balancer")
    handed_to = [f"handoff:{path}" for path in balancer["environment"]["PAYCORE_BALANCER_INSTANCES"].split(",")]
    for name, instance in instances(services).items():
        environment = instance["environment"]
        assert "ports" not in instance and "expose" not in instance, name
        assert environment["PAYCORE_LISTEN"] in handed_to, name
        assert environment["PAYCORE_METRICS_LISTEN"] not in handed_to, name
    assert [str(port) for port in balancer["ports"]] == ["9999:9999"]
