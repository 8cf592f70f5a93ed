"""Health polling: one poller among all instances, within the processors' rate limit,
its reports shared with every router; another instance takes over when it stops."""
from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import uvloop

from paycore.emulator import PaymentProcessor, ProcessorConfig
from paycore.service.health import HealthMonitor
from paycore.service.metrics import Metrics
from paycore.service.processor_client import ProcessorClient
from paycore.service.router import DEFAULT, FALLBACK, Router
from paycore.service.store.embedded.health_board import FileHealthBoard

WINDOW_S = 0.3
INTERVAL_MS = 320


class CountingClient(ProcessorClient):
    """Records when each health call is made, whichever instance makes it."""

    calls: list[tuple[str, float]] = []

    async def health(self):
        CountingClient.calls.append((self.name, time.monotonic()))
        return await super().health()


async def scenario(shared_dir: str) -> None:
    processors = [PaymentProcessor(ProcessorConfig(fee=Decimal(fee), health_interval=WINDOW_S))
                  for fee in ("0.07", "0.10")]
    servers = [await processor.serve("127.0.0.1", 0) for processor in processors]
    urls = [f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
    processors[DEFAULT].config.failing = True
    processors[FALLBACK].config.delay_ms = 40

    instances = []
    for _ in range(3):
        clients = (CountingClient("default", urls[0], 2000), CountingClient("fallback", urls[1], 2000))
        router = Router(default_max_latency_ms=1500, metrics=Metrics())
        monitor = HealthMonitor(FileHealthBoard(shared_dir), clients, router, INTERVAL_MS)
        monitor.start()
        instances.append((monitor, router, clients))
    await asyncio.sleep(2.0)

    pollers = [monitor for monitor, _, _ in instances if monitor.board.is_poller]
    assert len(pollers) == 1
    for _, router, _ in instances:
        assert router.processors[DEFAULT].failing
        assert router.processors[FALLBACK].latency_ms == 40
        assert router.choose() == FALLBACK

    # The poller goes away; another one continues the same schedule.
    await pollers[0].stop()
    pollers[0].board.close()
    processors[DEFAULT].config.failing = False
    await asyncio.sleep(2.5)
    remaining = [monitor for monitor, _, _ in instances if monitor is not pollers[0]]
    assert sum(monitor.board.is_poller for monitor in remaining) == 1
    for monitor, router, _ in instances:
        if monitor is not pollers[0]:
            assert not router.processors[DEFAULT].failing
            assert router.choose() == DEFAULT

    for name in ("default", "fallback"):
        times = [at for called, at in CountingClient.calls if called == name]
        assert len(times) >= 6
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        # Never two calls in one window: the spacing holds across the hand-over too.
        assert min(gaps) >= INTERVAL_MS / 1000 - 0.02, gaps

    for monitor, _, clients in instances:
        await monitor.stop()
        monitor.board.close()
        for client in clients:
            client.close()
    for server in servers:
        server.close()


def test_one_poller_shares_health_within_the_limit(tmp_path):
    uvloop.run(scenario(str(tmp_path)))
