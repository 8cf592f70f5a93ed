"""Run the payment-processor emulator: python -m paycore.emulator --port 8001 --fee 0.07"""
import argparse
import asyncio
import os
import signal
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import uvloop

from paycore.emulator.config import (
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_QUEUED,
    DEFAULT_TOKEN,
    ProcessorConfig,
)
from paycore.emulator.processor import PaymentProcessor
from paycore.ready import announce


def _env(name: str, default: object) -> str:
    return os.environ.get(f"EMULATOR_{name}", str(default))


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation as error:
        raise argparse.ArgumentTypeError(f"not a decimal: {text!r}") from error


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m paycore.emulator",
        description="Emulates a payment processor of the challenge. "
        "Every option can also be set by the environment variable EMULATOR_<OPTION>, "
        "e.g. EMULATOR_HEALTH_INTERVAL.",
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("PORT", 8001), help="0 picks a free port")
    parser.add_argument("--fee", type=_decimal, default=_env("FEE", "0.07"), help="fee per transaction, e.g. 0.07")
    parser.add_argument("--token", default=_env("TOKEN", DEFAULT_TOKEN), help="initial X-Rinha-Token")
    parser.add_argument("--delay", type=int, default=_env("DELAY", 0), help="initial delay in ms")
    parser.add_argument(
        "--failure",
        action="store_true",
        default=_env("FAILURE", "").lower() in {"1", "true", "yes", "on"},
        help="start in failure mode",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=_env("HEALTH_INTERVAL", DEFAULT_HEALTH_INTERVAL),
        help="seconds per answered health check",
    )
    parser.add_argument("--max-inflight", type=int, default=_env("MAX_INFLIGHT", DEFAULT_MAX_INFLIGHT))
    parser.add_argument("--max-queued", type=int, default=_env("MAX_QUEUED", DEFAULT_MAX_QUEUED))
    parser.add_argument(
        "--payments-file",
        type=Path,
        default=_env("PAYMENTS_FILE", "") or None,
        help="keep the processed payments in this file, read back at start (default: in memory only)",
    )
    return parser.parse_args(argv)


async def run(host: str, port: int, config: ProcessorConfig) -> None:
    # Handlers go in before the start-up line: whoever reads it may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    server = await PaymentProcessor(config).serve(host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"paycore emulator listening on http://{url_host}:{bound_port} (fee {config.fee}, token {config.token}, "
        f"delay {config.delay_ms} ms, failure {'on' if config.failing else 'off'}, "
        f"health interval {config.health_interval:g} s)",
        file=sys.stderr,
        flush=True,
    )
    announce([f"{url_host}:{bound_port}"])
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        config = ProcessorConfig(
            fee=arguments.fee,
            token=arguments.token,
            delay_ms=arguments.delay,
            failing=arguments.failure,
            health_interval=arguments.health_interval,
            max_inflight=arguments.max_inflight,
            max_queued=arguments.max_queued,
            payments_file=arguments.payments_file,
        )
    except ValueError as error:
        print(f"paycore emulator: {error}", file=sys.stderr)
        return 2
    uvloop.run(run(arguments.host, arguments.port, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
