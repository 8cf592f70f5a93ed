"""One service instance: build the core, listen, dispatch, stop cleanly."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

import uvloop

from paycore.core.accepted_ids import FULL, AcceptedIds
from paycore.core.journal import Journal
from paycore.core.ledger import Ledger
from paycore.core.ring_queue import RingQueue

from . import logs
from .accept import PaymentIntake
from .config import Settings
from .connections import ConnectionGuard, ConnectionLimits
from .delivery import Dispatcher
from .health import HealthMonitor
from .http_server import HttpProtocol
from .journal import JournalWriter
from .metrics import GaugeSources, Metrics, MetricsEndpoint
from .processor_client import ProcessorClient
from .recovery import Replay, recover
from .router import PROCESSOR_NAMES, Router
from .routes import Routes
from .summary import Summary

log = logging.getLogger("paycore.service")


async def _listen(address: str, protocol_factory) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        server = await loop.create_unix_server(protocol_factory, path, backlog=4096)
        os.chmod(path, 0o666)  # the load balancer may run as another user
        return server
    host, _, port = address.rpartition(":")
    return await loop.create_server(protocol_factory, host or "0.0.0.0", int(port),
                                    backlog=4096, reuse_address=True)


class Instance:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        os.makedirs(settings.shared_dir, exist_ok=True)
        self.ledger = Ledger(settings.shared_dir, settings.instance, settings.ledger_capacity)
        self.accepted_ids = AcceptedIds(os.path.join(settings.shared_dir, "accepted-ids.shm"),
                                        settings.accepted_id_slots)
        os.makedirs(settings.journal_dir, exist_ok=True)
        journal_path = os.path.join(settings.journal_dir, f"journal-{settings.instance}.log")
        self.replay = recover(journal_path, self.ledger.generation, settings.journal_sync)
        self._restore_shared_state(self.replay)
        self.journal = JournalWriter(Journal(journal_path, settings.journal_sync), self.ledger)
        self.queue = RingQueue(settings.queue_capacity)
        self.clients = tuple(
            ProcessorClient(name, url, settings.request_timeout_ms)
            for name, url in zip(PROCESSOR_NAMES, (settings.default_url, settings.fallback_url)))
        self.metrics = Metrics()
        self.router = Router(settings.default_max_latency_ms, self.metrics)
        self.dispatcher = Dispatcher(
            self.queue, self.router, self.clients, self.ledger, self.journal, self.metrics,
            max_in_flight=settings.max_in_flight, retry_min_ms=settings.retry_min_ms,
            retry_max_ms=settings.retry_max_ms, pin_release_ms=settings.pin_release_ms)
        self.health = HealthMonitor(settings.shared_dir, self.clients, self.router,
                                    settings.health_interval_ms)
        self.intake = PaymentIntake(self.accepted_ids, self.queue, self.journal, self.dispatcher.notify)
        self.routes = Routes(self.intake, Summary(self.ledger), self.ledger, self.accepted_ids, self.metrics)
        self.connections = ConnectionGuard(ConnectionLimits(
            settings.max_connections, settings.max_head_bytes, settings.max_body_bytes,
            settings.client_request_timeout_ms, settings.client_idle_timeout_ms))
        self.metrics_endpoint = MetricsEndpoint(self.metrics, GaugeSources(
            self.queue, self.dispatcher, self.router, self.journal, self.connections))
        self._servers: list[asyncio.AbstractServer] = []
        self._metrics_server: asyncio.AbstractServer | None = None

    def _restore_shared_state(self, replay: Replay) -> None:
        """This instance's ledger share and accepted ids, as its journal has them."""
        self.ledger.restore(replay.generation, replay.settled)
        refused = sum(self.accepted_ids.claim(uuid16, cents) == FULL for uuid16, cents in replay.accepted)
        if refused:
            log.error("%d journaled payment ids did not fit the accepted-id table", refused)
        if replay.unsent or replay.unresolved:
            log.warning("resuming %d unsent payments and %d with an unknown outcome from the journal",
                        len(replay.unsent), len(replay.unresolved))

    async def start(self) -> None:
        self.dispatcher.resume(self.replay.unsent, self.replay.unresolved)
        self.dispatcher.start()
        self.health.start()
        for address in self.settings.listen:
            self._servers.append(await _listen(
                address, lambda: HttpProtocol(self.routes, self.journal, self.connections, self.metrics)))
        if self.settings.metrics_listen:
            self._metrics_server = await _listen(
                self.settings.metrics_listen,
                lambda: HttpProtocol(self.metrics_endpoint, self.journal, self.connections, self.metrics))
        self.connections.start()
        log.info("instance %s listening on %s, metrics on %s", self.settings.instance,
                 ", ".join(self.settings.listen), self.settings.metrics_listen or "none")

    def _undelivered(self) -> bool:
        return bool(len(self.queue) or self.dispatcher.in_flight or self.dispatcher.unresolved)

    async def stop(self) -> None:
        """Stop accepting, give queued and in-flight payments a bounded time,
        flush the journal, close. What is left is in the journal for the next start."""
        for server in self._servers:
            server.close()
        self.intake.stop_accepting()
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_ms / 1000
        while self._undelivered() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self._undelivered():
            log.warning("stopping with %d queued, %d in flight, %d unresolved payments; "
                        "the journal keeps them for the next start",
                        len(self.queue), self.dispatcher.in_flight, self.dispatcher.unresolved)
        # Closed only now: scrapes go on while the instance drains.
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.connections.stop()
        await self.dispatcher.stop()
        await self.health.stop()
        for client in self.clients:
            client.close()
        self.journal.close()
        self.ledger.close()
        self.accepted_ids.close()


async def _serve(settings: Settings) -> None:
    instance = Instance(settings)
    await instance.start()
    # Everything built so far lives as long as the process: keep it out of the
    # collector's way so a full collection costs the request path nothing.
    gc.collect()
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await instance.stop()


def run(settings: Settings | None = None) -> None:
    logs.configure(os.environ.get("PAYCORE_LOG_LEVEL", "INFO"))
    uvloop.run(_serve(settings or Settings()))
