"""The whole local topology as child processes: two emulated processors (unless
PROCESSOR_DEFAULT_URL and PROCESSOR_FALLBACK_URL name real ones), the service
instances, the load balancer in front (service/balancer.py, handing its
listening sockets to the instances' hand-off sockets, as docker-compose.yml
runs it), and with the Redis store a redis-server the instances share. Each
instance also listens on a unix socket of its own, for asking one instance
directly (tests, tools). Every child says where it listens once it does
(paycore.ready): a port 0 is chosen by the child that binds it.

`python -m paycore.stack` (`make run`) runs it in the foreground until Ctrl-C
or SIGTERM, with its state kept in a run directory (paycore.layout) and
resumed at the next start; tests and benchmarks use the Stack class.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from paycore.layout import StateLayout
from paycore.ready import start_listening
from paycore.redis_server import RedisServer

INSTANCES = 2  # as docker-compose.yml runs
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1
PROCESSORS = (("default", "0.07"), ("fallback", "0.10"))


@dataclass
class StackSettings:
    # 0: a port the OS picks for the process that listens; the Stack then knows it.
    port: int = 9999
    default_port: int = 8001
    fallback_port: int = 8002
    default_url: str | None = None
    fallback_url: str | None = None
    # Where the stack keeps its state across starts (paycore.layout); None:
    # scratch directories on tmpfs, removed at stop.
    run_dir: Path | None = None
    # Extra environment for the service instances (e.g. shorter timeouts in tests).
    instance_env: dict[str, str] = field(default_factory=dict)
    emulator_args: tuple[str, ...] = ()
    instances: int = INSTANCES
    # "embedded"; "redis": a redis-server of the stack's own; or redis://HOST:PORT/DB.
    # With Redis, each instance gets a shared directory of its own, as on separate hosts.
    store: str = "embedded"
    quiet: bool = False
    # The instances' PAYCORE_ADMIN_TOKEN, which POST /purge-payments needs
    # (Authorization: Bearer <token>); a fresh one per stack unless given.
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    # docker-compose service name ("load-balancer", "api1", ...) -> cgroup
    # directories its process joins before it starts, to hold it to the limits.
    cgroups: dict[str, tuple[str, ...]] = field(default_factory=dict)


class Stack:
    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.emulated = not (self.settings.default_url and self.settings.fallback_url)
        # Two listeners given one port would not both start: the balancer exits
        # and the emulator already there answers its clients with 404s.
        ports = [port for port in self._tcp_ports() if port]
        if len(set(ports)) < len(ports):
            raise ValueError(f"the stack's TCP ports must differ: {ports}")
        self.layout = (StateLayout.kept_in(self.settings.run_dir) if self.settings.run_dir
                       else StateLayout.scratch())
        self.run_dir = self.layout.run_dir
        self.shared_dir = self.layout.shared
        self.socket_dir = self.layout.sockets
        # Known once the processes listen (start()).
        self.port = 0
        self.url = ""
        self.default_url = self.settings.default_url
        self.fallback_url = self.settings.fallback_url
        self.processors: list[subprocess.Popen] = []
        self.instances: dict[int, subprocess.Popen] = {}
        self.balancer: subprocess.Popen | None = None
        self.redis: RedisServer | None = None
        self.store_url = self.settings.store

    def _tcp_ports(self) -> tuple[int, ...]:
        settings = self.settings
        if self.emulated:
            return settings.port, settings.default_port, settings.fallback_port
        return (settings.port,)

    def _options(self, env: dict[str, str] | None, service: str | None) -> dict:
        """How every child is started: its environment, output, session, cgroups.
        A quiet stack writes each service's log to logs/<service>.log instead."""
        output = None
        if self.settings.quiet:
            self.layout.logs.mkdir(parents=True, exist_ok=True)
            output = open(self.log_path(service), "ab")  # noqa: SIM115 - the child keeps its own copy
        cgroups = self.settings.cgroups.get(service, ()) if service else ()

        def prepare_child() -> None:
            # A killed benchmark or test run must not leave its stack running.
            _stop_with_parent()
            for cgroup in cgroups:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                    procs.write(str(os.getpid()))

        return {"env": {**os.environ, **(env or {})}, "stdout": output, "stderr": output,
                "start_new_session": True, "preexec_fn": prepare_child}

    def log_path(self, service: str | None) -> Path:
        return self.layout.logs / f"{service or 'process'}.log"

    def _spawn(self, command: list[str], service: str | None = None) -> subprocess.Popen:
        options = self._options(None, service)
        try:
            return subprocess.Popen(command, **options)
        finally:
            _close_log(options)

    def _launch(self, command: list[str], env: dict[str, str] | None = None,
                service: str | None = None) -> tuple[subprocess.Popen, list[str]]:
        """A server process, once it listens, and the addresses it listens on."""
        options = self._options(env, service)
        try:
            return start_listening(command, STARTUP_TIMEOUT_S, **options)
        except (RuntimeError, TimeoutError) as error:
            if not self.settings.quiet:
                raise
            log = self.log_path(service).read_text(errors="replace").splitlines()[-20:]
            raise type(error)(f"{error}; the end of {self.log_path(service)}:\n" + "\n".join(log)) from error
        finally:
            _close_log(options)

    def start(self) -> Stack:
        self.layout.create()
        try:
            if self.settings.store == "redis":
                self.redis = RedisServer(self.layout.redis).start(
                    lambda command: self._spawn(command, "redis"))
                self.store_url = self.redis.url
            if self.emulated:
                self._start_processors()
            for index in range(1, self.settings.instances + 1):
                self.start_instance(index)
            self._start_balancer()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_processors(self) -> None:
        urls = []
        for (name, fee), port in zip(PROCESSORS, (self.settings.default_port, self.settings.fallback_port)):
            process, (address,) = self._launch(
                [sys.executable, "-m", "paycore.emulator", "--host", "127.0.0.1", "--port", str(port),
                 "--fee", fee, *self.layout.emulator_args(name), *self.settings.emulator_args])
            self.processors.append(process)
            urls.append(f"http://{address}")
        self.default_url, self.fallback_url = urls

    def socket_path(self, index: int) -> str:
        return str(self.socket_dir / f"api-{index}.sock")

    def instance_shared_dir(self, index: int) -> Path:
        return self.shared_dir if self.store_url == "embedded" else self.shared_dir / f"host-{index}"

    def instance_data_dir(self, index: int) -> Path:
        """The journal and payments record, on disk: one per host."""
        data = self.layout.data
        return data if self.store_url == "embedded" else data / f"host-{index}"

    def handoff_path(self, index: int) -> str:
        return str(self.socket_dir / f"api-{index}.handoff")

    def start_instance(self, index: int) -> None:
        env = {
            "PAYCORE_INSTANCE": str(index),
            "PAYCORE_LISTEN": f"unix:{self.socket_path(index)},handoff:{self.handoff_path(index)}",
            "PAYCORE_STORE": self.store_url,
            "PAYCORE_SHARED_DIR": str(self.instance_shared_dir(index)),
            "PAYCORE_DATA_DIR": str(self.instance_data_dir(index)),
            "PROCESSOR_DEFAULT_URL": self.default_url,
            "PROCESSOR_FALLBACK_URL": self.fallback_url,
            "PAYCORE_ADMIN_TOKEN": self.settings.admin_token,
            **self.settings.instance_env,
        }
        self.instances[index], _ = self._launch([sys.executable, "-m", "paycore.service"], env,
                                                service=f"api{index}")

    def stop_instance(self, index: int, signum: int = signal.SIGTERM) -> int:
        process = self.instances.pop(index)
        return _stop(process, signum)

    def _start_balancer(self) -> None:
        self.balancer, (address,) = self._launch(
            [sys.executable, "-m", "paycore.service.balancer"],
            {"PAYCORE_BALANCER_LISTEN": f"127.0.0.1:{self.settings.port}",
             "PAYCORE_BALANCER_INSTANCES": ",".join(
                 self.handoff_path(index) for index in range(1, self.settings.instances + 1))},
            service="load-balancer")
        self.port = int(address.rsplit(":", 1)[1])
        self.url = f"http://{address}"

    def stop(self) -> None:
        if self.balancer is not None:
            _stop(self.balancer, signal.SIGTERM)
            self.balancer = None
        for index in list(self.instances):
            self.stop_instance(index)
        for process in self.processors:
            _stop(process, signal.SIGTERM)
        self.processors.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        self.layout.release()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _stop(process: subprocess.Popen, signum: int) -> int:
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _close_log(options: dict) -> None:
    if options["stderr"] is not None:
        options["stderr"].close()


def _stop_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent goes (Linux prctl): make does
    not pass its SIGTERM on to `make run`, and a Stack's owner may be killed
    before it can stop what it started."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _port(variable: str, default: int) -> int:
    return int(os.environ.get(variable, default))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paycore stack",
        description="Run the local topology in the foreground until Ctrl-C or SIGTERM. Its state "
                    "(journals, the emulated processors' payments) is kept in PAYCORE_RUN_DIR "
                    "(default: run/ in the current directory) and resumed at the next start.")
    parser.add_argument("--clean", action="store_true",
                        help="start from nothing: forget the state kept in the run directory")
    arguments = parser.parse_args(argv)
    _stop_with_parent()
    stack = Stack(StackSettings(
        port=_port("PAYCORE_PORT", 9999),
        default_port=_port("PAYCORE_DEFAULT_PORT", 8001),
        fallback_port=_port("PAYCORE_FALLBACK_PORT", 8002),
        default_url=os.environ.get("PROCESSOR_DEFAULT_URL"),
        fallback_url=os.environ.get("PROCESSOR_FALLBACK_URL"),
        run_dir=Path(os.environ.get("PAYCORE_RUN_DIR", "run")),
        store=os.environ.get("PAYCORE_STORE", "embedded"),
        **({"admin_token": os.environ["PAYCORE_ADMIN_TOKEN"]} if os.environ.get("PAYCORE_ADMIN_TOKEN") else {}),
    ))
    if arguments.clean:
        stack.layout.clear()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    stack.start()
    emulated = ", emulated" if stack.emulated else ""
    store = "embedded store" if stack.store_url == "embedded" else f"store {stack.store_url}"
    print(f"paycore: serving on {stack.url}; processors {stack.default_url} (default), "
          f"{stack.fallback_url} (fallback){emulated}; {store}; state kept in {stack.run_dir}, "
          f"shared state and metrics sockets in {stack.shared_dir}; Ctrl-C stops everything",
          flush=True)
    print(f"paycore: to purge: curl -X POST -H 'Authorization: Bearer {stack.settings.admin_token}' "
          f"{stack.url}/purge-payments (PAYCORE_ADMIN_TOKEN sets the token)", flush=True)
    stopping.wait()
    stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
