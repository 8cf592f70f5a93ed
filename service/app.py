"""One service instance: build the core, listen, dispatch, stop cleanly."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

import uvloop

from paycore.core.ring_queue import RingQueue
from paycore.ready import announce

from . import logs
from .accept import PaymentIntake
from .admin import AdminToken
from .config import Settings
from .connections import ConnectionGuard, ConnectionLimits
from .delivery import Dispatcher
from .gc_pauses import GcPauses
from .handoff import HandoffListener, claim_socket_path
from .health import HealthMonitor
from .http_server import HttpProtocol
from .lookup import PaymentLookup
from .metrics import Metrics, MetricsEndpoint
from .processor_client import ProcessorClient
from .router import PROCESSOR_NAMES, Router
from .routes import Routes
from .store import open_store
from .summary import Summary

log = logging.getLogger("paycore.service")


async def _listen(address: str, protocol_factory) -> asyncio.AbstractServer | HandoffListener:
    loop = asyncio.get_running_loop()
    if address.startswith("handoff:"):
        return HandoffListener(address[len("handoff:"):], protocol_factory)
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        claim_socket_path(path)
        server = await loop.create_unix_server(protocol_factory, path, backlog=4096)
        os.chmod(path, 0o666)  # its clients (tools, another container) may run as another user
        return server
    host, _, port = address.rpartition(":")
    return await loop.create_server(protocol_factory, host or "0.0.0.0", int(port),
                                    backlog=4096, reuse_address=True)


def _bound_address(address: str, server: asyncio.AbstractServer | HandoffListener) -> str:
    """The address as clients reach it: a TCP port 0 becomes the one the OS chose."""
    if address.startswith(("handoff:", "unix:")):
        return address
    host, port = server.sockets[0].getsockname()[:2]
    return f"{host}:{port}"


class Instance:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.queue = RingQueue(settings.queue_capacity)
        self.metrics = Metrics()
        self.metrics.register_gauge("paycore_queue_depth", "gauge", "Payments waiting in the queue.",
                                    self.queue.__len__)
        self.clients = tuple(
            ProcessorClient(name, url, settings.request_timeout_ms)
            for name, url in zip(PROCESSOR_NAMES, (settings.default_url, settings.fallback_url)))
        self.router = Router(settings.default_max_latency_ms, self.metrics)
        self.dispatcher = Dispatcher(
            self.queue, self.router, self.clients, self.store, self.metrics,
            max_in_flight=settings.max_in_flight, retry_min_ms=settings.retry_min_ms,
            retry_max_ms=settings.retry_max_ms, pin_release_ms=settings.pin_release_ms)
        self.health = HealthMonitor(self.store.health, self.clients, self.router,
                                    settings.health_interval_ms)
        self.intake = PaymentIntake(self.store)
        self.routes = Routes(self.intake, Summary(self.store), PaymentLookup(self.store), self.store,
                             self.metrics, AdminToken(settings.admin_token))
        self.connections = ConnectionGuard(ConnectionLimits(
            settings.max_connections, settings.max_head_bytes, settings.max_body_bytes,
            settings.client_request_timeout_ms, settings.client_idle_timeout_ms))
        self.connections.register_metrics(self.metrics)
        self.gc_pauses = GcPauses()
        self.gc_pauses.register_metrics(self.metrics)
        self.metrics_endpoint = MetricsEndpoint(self.metrics)
        self._servers: list[asyncio.AbstractServer | HandoffListener] = []
        self._metrics_server: asyncio.AbstractServer | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        await self.store.start(self.queue, self.dispatcher)
        self.store.register_metrics(self.metrics)
        self.dispatcher.start()
        self.health.start()
        for address in self.settings.listen:
            self._servers.append(await _listen(
                address, lambda: HttpProtocol(self.routes, self.store, self.connections, self.metrics)))
        if self.settings.metrics_listen:
            self._metrics_server = await _listen(
                self.settings.metrics_listen,
                lambda: HttpProtocol(self.metrics_endpoint, self.store, self.connections, self.metrics))
        self.connections.start()
        # Everything built so far lives as long as the process: keep it out of the
        # collector's way so a full collection costs the request path nothing.
        gc.collect()
        gc.freeze()
        self.gc_pauses.start()
        self.addresses = [_bound_address(address, server)
                          for address, server in zip(self.settings.listen, self._servers)]
        log.info("instance %s listening on %s, metrics on %s", self.settings.instance,
                 ", ".join(self.addresses), self.settings.metrics_listen or "none")

    def _undelivered(self) -> bool:
        return bool(len(self.queue) or self.dispatcher.in_flight or self.dispatcher.unresolved)

    async def stop(self) -> None:
        """Stop accepting, give queued and in-flight payments a bounded time,
        close the store. What is left stays pending in the store (the embedded
        store's journal) for the next start, or another instance."""
        for server in self._servers:
            server.close()
        self.intake.stop_accepting()
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_ms / 1000
        while self._undelivered() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self._undelivered():
            log.warning("stopping with %d queued, %d in flight, %d unresolved payments; "
                        "they stay pending in the store",
                        len(self.queue), self.dispatcher.in_flight, self.dispatcher.unresolved)
        # Closed only now: scrapes go on while the instance drains.
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.connections.stop()
        await self.dispatcher.stop()
        await self.health.stop()
        for client in self.clients:
            client.close()
        await self.store.close()
        self.gc_pauses.stop()
        gc.unfreeze()  # what start froze is the collector's again (an instance in a test's process)


async def _serve(settings: Settings) -> None:
    instance = Instance(settings)
    await instance.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # After the handlers: whoever reads the announcement may signal at once.
    announce(instance.addresses)
    await stopping.wait()
    await instance.stop()


def run(settings: Settings | None = None) -> None:
    logs.configure(os.environ.get("PAYCORE_LOG_LEVEL", "INFO"))
    uvloop.run(_serve(settings or Settings()))
