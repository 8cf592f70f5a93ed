"""The `paycore` command.

    paycore serve [--listen ...] [--instance N] ...   one service instance
    paycore balance [--listen HOST:PORT] [--instances PATH,...]   the load balancer
    paycore processor [--port 8001 --fee 0.07 ...]    the payment-processor emulator
    paycore stack [--clean]                           the local topology (make run)
    paycore summary [--url URL] [--from ISO] [--to ISO]
    paycore bench [--seconds S] [--calibrate] ...     the benchmark (from a source checkout)

Exit codes: 0 success; 1 the service answered with an error; 2 bad usage;
3 the service could not be reached.
"""
from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode, urlsplit

EXIT_OK = 0
EXIT_SERVICE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# serve's options and the environment variables they set (README, Configuration).
SERVE_OPTIONS = {
    "--instance": "PAYCORE_INSTANCE",
    "--listen": "PAYCORE_LISTEN",
    "--store": "PAYCORE_STORE",
    "--shared-dir": "PAYCORE_SHARED_DIR",
    "--default-url": "PROCESSOR_DEFAULT_URL",
    "--fallback-url": "PROCESSOR_FALLBACK_URL",
}
BALANCE_OPTIONS = {
    "--listen": "PAYCORE_BALANCER_LISTEN",
    "--instances": "PAYCORE_BALANCER_INSTANCES",
}


def _set_environment(arguments: argparse.Namespace, options: dict[str, str]) -> None:
    for option, variable in options.items():
        value = getattr(arguments, option.lstrip("-").replace("-", "_"))
        if value is not None:
            os.environ[variable] = value


def _serve(arguments: argparse.Namespace) -> int:
    _set_environment(arguments, SERVE_OPTIONS)
    from paycore.service.app import run

    run()
    return EXIT_OK


def _balance(arguments: argparse.Namespace) -> int:
    _set_environment(arguments, BALANCE_OPTIONS)
    from paycore.service.balancer import main

    main()
    return EXIT_OK


def _summary(arguments: argparse.Namespace) -> int:
    from paycore.core.timestamp import parse_timestamp

    for bound in (arguments.from_, arguments.to):
        if bound is not None:
            try:
                parse_timestamp(bound)
            except ValueError as error:
                print(f"paycore summary: {error}", file=sys.stderr)
                return EXIT_USAGE
    url = urlsplit(arguments.url)
    query = urlencode({name: value for name, value in (("from", arguments.from_), ("to", arguments.to))
                       if value is not None})
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80,
                                            timeout=arguments.timeout)
    try:
        connection.request("GET", "/payments-summary" + (f"?{query}" if query else ""))
        response = connection.getresponse()
        body = response.read().decode()
    except OSError as error:
        print(f"paycore summary: cannot reach {arguments.url}: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        connection.close()
    if response.status != 200:
        print(f"paycore summary: {response.status} {body}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    print(body)
    return EXIT_OK


def benchmark_script() -> Path:
    """perf/bench.py next to this package: the benchmark needs the source tree
    (the load generator's C source, the compose file)."""
    return Path(__file__).resolve().parents[1] / "perf" / "bench.py"


def _bench(arguments: argparse.Namespace) -> int:
    script = benchmark_script()
    if not script.is_file():
        print(f"paycore bench: needs a source checkout ({script} not found)", file=sys.stderr)
        return EXIT_USAGE
    if arguments.seconds is not None and arguments.seconds <= 0:
        print("paycore bench: --seconds must be positive", file=sys.stderr)
        return EXIT_USAGE
    env = dict(os.environ)
    if arguments.seconds is not None:
        env["BENCH_SECONDS"] = f"{arguments.seconds:g}"
    if arguments.flamegraph:
        env["BENCH_FLAMEGRAPH"] = "1"
    if arguments.low_latency_host:
        env["BENCH_LOW_LATENCY_HOST"] = "1"
    if arguments.store is not None:
        env["BENCH_STORE"] = arguments.store
    command = [sys.executable, str(script), *(["--calibrate"] if arguments.calibrate else [])]
    return EXIT_OK if subprocess.run(command, env=env).returncode == 0 else EXIT_SERVICE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paycore", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 success, 1 service error, 2 usage, 3 unreachable.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one service instance (configured by environment)")
    for option, variable in SERVE_OPTIONS.items():
        serve.add_argument(option, help=f"sets {variable}")
    serve.set_defaults(handler=_serve)

    balance = commands.add_parser("balance", help="run the load balancer in front of the instances")
    for option, variable in BALANCE_OPTIONS.items():
        balance.add_argument(option, help=f"sets {variable}")
    balance.set_defaults(handler=_balance)

    # Listed for --help; their arguments go to the emulator and the stack untouched (see main).
    commands.add_parser("processor", add_help=False,
                        help="run the payment-processor emulator (paycore processor --help)")

    commands.add_parser("stack", add_help=False,
                        help="run the local topology in the foreground (make run; paycore stack --help)")

    summary = commands.add_parser("summary", help="print the payments summary of a running service")
    summary.add_argument("--url", default="http://127.0.0.1:9999", help="the service (load balancer)")
    summary.add_argument("--from", dest="from_", metavar="ISO", help="inclusive lower bound")
    summary.add_argument("--to", metavar="ISO", help="inclusive upper bound")
    summary.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    summary.set_defaults(handler=_summary)

    bench = commands.add_parser(
        "bench", help="run the benchmark of SPEC §4 against the local topology (make bench)",
        description="Exit 0 when no request failed, no check found an inconsistency and no payment "
                    "was left behind; 1 otherwise.")
    bench.add_argument("--seconds", type=float, help="length of the run (default 300; the fault "
                                                     "schedule scales with it)")
    bench.add_argument("--calibrate", action="store_true",
                       help="run the load against a constant-response server instead: the generator's floor")
    bench.add_argument("--flamegraph", action="store_true", help="record py-spy flamegraphs of both instances")
    bench.add_argument("--low-latency-host", action="store_true",
                       help="keep idle CPUs polling during the run (root; see perf/host.py)")
    bench.add_argument("--store", help="embedded (default), redis, or embedded,redis: one run each, "
                                       "printed side by side")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["processor"]:
        from paycore.emulator.__main__ import main as emulator_main

        return emulator_main(argv[1:])
    if argv[:1] == ["stack"]:
        from paycore.stack import main as stack_main

        return stack_main(argv[1:])
    arguments = build_parser().parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
