"""Service settings, read once from environment variables (documented in the README)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_INSTANCE = "1"
DEFAULT_SHARED_DIR = "/dev/shm/paycore"
DEFAULT_DATA_DIR = "/var/lib/paycore"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    instance: str = field(default_factory=lambda: _env("PAYCORE_INSTANCE", DEFAULT_INSTANCE))
    # Comma-separated: handoff:/path (where the load balancer, service.balancer,
    # hands over its listening sockets), unix:/path/to.sock and/or host:port.
    listen: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            item.strip() for item in _env("PAYCORE_LISTEN", "0.0.0.0:8080").split(",") if item.strip()
        )
    )
    # Where the instances share accepted ids, pending payments, the ledger and the
    # health board: "embedded" (shared memory in shared_dir plus a journal per
    # instance, one host) or redis://HOST:PORT/DB (any number of hosts).
    store: str = field(default_factory=lambda: _env("PAYCORE_STORE", "embedded"))
    # Redis store: an instance that has not renewed its lease for this long is
    # taken for dead, and the payments it had taken are taken over by the others.
    store_lease_ms: int = field(default_factory=lambda: _env_int("PAYCORE_STORE_LEASE_MS", 3000))
    # Redis store: a connection on which commands wait and nothing comes back for
    # this long is dropped, and what waited fails (a new payment gets 503).
    store_timeout_ms: int = field(default_factory=lambda: _env_int("PAYCORE_STORE_TIMEOUT_MS", 2000))
    # Redis store: it starts only on a Redis whose maxmemory-policy is
    # noeviction; 1 vouches for that when the server hides its CONFIG.
    store_assume_noeviction: bool = field(
        default_factory=lambda: _env_int("PAYCORE_STORE_ASSUME_NOEVICTION", 0) != 0)
    # Embedded store, shared by every instance on the host (tmpfs): the accepted
    # ids, the ledger's uncommitted tail, the health board.
    shared_dir: str = field(default_factory=lambda: _env("PAYCORE_SHARED_DIR", DEFAULT_SHARED_DIR))
    # Embedded store, on disk: each instance's journal (journal-<instance>/)
    # and the host's payments record (payments.db). With journal_sync they
    # survive the machine, not only the process.
    data_dir: str = field(default_factory=lambda: _env("PAYCORE_DATA_DIR", DEFAULT_DATA_DIR))
    journal_sync: bool = field(default_factory=lambda: _env_int("PAYCORE_JOURNAL_SYNC", 0) != 0)
    journal_segment_bytes: int = field(
        default_factory=lambda: _env_int("PAYCORE_JOURNAL_SEGMENT_BYTES", 8 << 20))
    # How long the event loop may wait for the journal's writer instead of
    # being woken by it (only while writes usually take less).
    journal_spin_us: int = field(default_factory=lambda: _env_int("PAYCORE_JOURNAL_SPIN_US", 50))
    # A correlationId posted again within this window is answered at once
    # (200 / 409); the table remembers up to idempotency_capacity ids per
    # window, and shortens the window rather than refuse payments past that.
    # The default capacity is an hour at 300 payments/s, the final round's
    # average: 55 MiB of the hosts' shared tmpfs (53 bytes per id).
    idempotency_window_s: int = field(default_factory=lambda: _env_int("PAYCORE_IDEMPOTENCY_WINDOW_S", 3600))
    idempotency_capacity: int = field(
        default_factory=lambda: _env_int("PAYCORE_IDEMPOTENCY_CAPACITY", 1_080_000))
    # Settlements an instance holds in shared memory until the record commits them.
    ledger_tail_capacity: int = field(default_factory=lambda: _env_int("PAYCORE_LEDGER_TAIL_CAPACITY", 65536))
    # The payments record keeps settled payments from this many whole days
    # back; 0: all of them, for ever.
    retention_days: int = field(default_factory=lambda: _env_int("PAYCORE_RETENTION_DAYS", 0))
    # Prometheus metrics (GET /metrics), unix:/path or host:port; empty: none.
    # By default a socket next to the shared state: unique per instance even when
    # all instances share one network namespace (the local stack, concurrent test
    # stacks), and never one the load balancer forwards to (it knows only the API
    # sockets). Prometheus scrapes TCP only, so docker-compose.yml gives each
    # container a port on the backend network instead, which nothing publishes.
    # None (unset): that default.
    metrics_listen: str | None = field(default_factory=lambda: os.environ.get("PAYCORE_METRICS_LISTEN"))
    default_url: str = field(
        default_factory=lambda: _env("PROCESSOR_DEFAULT_URL", "http://payment-processor-default:8080")
    )
    fallback_url: str = field(
        default_factory=lambda: _env("PROCESSOR_FALLBACK_URL", "http://payment-processor-fallback:8080")
    )
    # 60 s of the final round's peak (~600 payments/s) fits with room to spare.
    queue_capacity: int = field(default_factory=lambda: _env_int("PAYCORE_QUEUE_CAPACITY", 65536))
    max_in_flight: int = field(default_factory=lambda: _env_int("PAYCORE_MAX_IN_FLIGHT", 600))
    request_timeout_ms: int = field(default_factory=lambda: _env_int("PAYCORE_REQUEST_TIMEOUT_MS", 6000))
    # Above this expected latency the default loses to a faster fallback (see README: routing).
    default_max_latency_ms: int = field(
        default_factory=lambda: _env_int("PAYCORE_DEFAULT_MAX_LATENCY_MS", 1500)
    )
    health_interval_ms: int = field(default_factory=lambda: _env_int("PAYCORE_HEALTH_INTERVAL_MS", 5100))
    retry_min_ms: int = field(default_factory=lambda: _env_int("PAYCORE_RETRY_MIN_MS", 50))
    retry_max_ms: int = field(default_factory=lambda: _env_int("PAYCORE_RETRY_MAX_MS", 2000))
    # An unknown outcome (timeout) pins a payment to its processor; after this long
    # with no answer the processor is asked whether it holds it before going elsewhere.
    pin_release_ms: int = field(default_factory=lambda: _env_int("PAYCORE_PIN_RELEASE_MS", 15000))
    # On SIGTERM: how long queued and in-flight payments get to finish.
    drain_timeout_ms: int = field(default_factory=lambda: _env_int("PAYCORE_DRAIN_TIMEOUT_MS", 10000))
    max_connections: int = field(default_factory=lambda: _env_int("PAYCORE_MAX_CONNECTIONS", 4096))
    max_head_bytes: int = field(default_factory=lambda: _env_int("PAYCORE_MAX_HEAD_BYTES", 8192))
    max_body_bytes: int = field(default_factory=lambda: _env_int("PAYCORE_MAX_BODY_BYTES", 16384))
    # A request must arrive whole within this; a keep-alive connection may idle this long.
    client_request_timeout_ms: int = field(
        default_factory=lambda: _env_int("PAYCORE_CLIENT_REQUEST_TIMEOUT_MS", 5000))
    client_idle_timeout_ms: int = field(
        default_factory=lambda: _env_int("PAYCORE_CLIENT_IDLE_TIMEOUT_MS", 75000))

    # The operator's token for POST /purge-payments (Authorization: Bearer <token>);
    # empty: nobody may purge. Kept out of the settings' repr, so never logged.
    admin_token: str = field(default_factory=lambda: _env("PAYCORE_ADMIN_TOKEN", ""), repr=False)

    def __post_init__(self) -> None:
        # Derived from the settings they follow, whether those came from the environment or not.
        if self.metrics_listen is None:
            object.__setattr__(self, "metrics_listen", f"unix:{self.shared_dir}/metrics-{self.instance}.sock")
        if self.retention_days < 0:
            raise SystemExit(f"PAYCORE_RETENTION_DAYS must be 0 (keep everything) or more, got {self.retention_days}")
        # A unix socket path is taken over at start: the API's socket would serve metrics.
        if self.metrics_listen in self.listen:
            raise SystemExit(f"PAYCORE_METRICS_LISTEN must not be one of PAYCORE_LISTEN: {self.metrics_listen}")
