"""The whole local topology as child processes: two emulated processors (unless
PROCESSOR_DEFAULT_URL and PROCESSOR_FALLBACK_URL name real ones), the service
instances, the load balancer in front (service/balancer.py, handing client
connections to the instances' hand-off sockets, as docker-compose.yml runs
it), and with the Redis store a redis-server the instances share. Each
instance also listens on a unix socket of its own, for asking one instance
directly (tests, tools).

`python -m paycore.stack` runs it in the foreground until Ctrl-C or SIGTERM;
tests and benchmarks use the Stack class.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from paycore.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
INSTANCES = 2  # as docker-compose.yml runs
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1
TMPFS = "/dev/shm"


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """Distinct loopback TCP ports nothing listens on right now, none in avoid.
    Each probe stays bound until all are chosen: a probe closed at once frees its
    port, and the next probe may be given the same one."""
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
            if probe.getsockname()[1] not in avoid:
                ports.append(probe.getsockname()[1])
    finally:
        for probe in probes:
            probe.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def wait_for_tcp(host: str, port: int, timeout_s: float = STARTUP_TIMEOUT_S,
                 process: subprocess.Popen | None = None) -> None:
    """Until something listens on host:port; with process, fail at once if it exits first."""
    _wait_for(lambda: socket.create_connection((host, port), timeout=0.5), f"{host}:{port}",
              timeout_s, process)


def wait_for_unix(path: str, timeout_s: float = STARTUP_TIMEOUT_S,
                  process: subprocess.Popen | None = None) -> None:
    def connect() -> socket.socket:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            probe.close()
            raise
        return probe
    _wait_for(connect, path, timeout_s, process)


def _wait_for(connect, address: str, timeout_s: float, process: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode} "
                               f"before listening on {address}")
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address}") from None
            time.sleep(0.05)


@dataclass
class StackSettings:
    port: int = 9999
    default_port: int = 8001
    fallback_port: int = 8002
    default_url: str | None = None
    fallback_url: str | None = None
    run_dir: Path | None = None
    # The instances' shared state and journals. None: a fresh directory on
    # tmpfs (/dev/shm), as docker-compose.yml mounts it, removed at stop; a
    # journal write on a disk filesystem can stall for a second when the disk does.
    shared_dir: Path | None = None
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
        if len(set(self.tcp_ports)) < len(self.tcp_ports):
            raise ValueError(f"the stack's TCP ports must differ: {self.tcp_ports}")
        self._own_run_dir = self.settings.run_dir is None
        self.run_dir = Path(self.settings.run_dir or tempfile.mkdtemp(prefix="paycore-"))
        self._own_shared_dir = self.settings.shared_dir is None
        self.shared_dir = Path(self.settings.shared_dir or tempfile.mkdtemp(
            prefix="paycore-shared-", dir=TMPFS if os.path.isdir(TMPFS) else None))
        self.socket_dir = self.run_dir / "sockets"
        if self.emulated:
            self.default_url = f"http://127.0.0.1:{self.settings.default_port}"
            self.fallback_url = f"http://127.0.0.1:{self.settings.fallback_port}"
        else:
            self.default_url = self.settings.default_url
            self.fallback_url = self.settings.fallback_url
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.processors: list[subprocess.Popen] = []
        self.instances: dict[int, subprocess.Popen] = {}
        self.balancer: subprocess.Popen | None = None
        self.redis: RedisServer | None = None
        self.store_url = self.settings.store

    @property
    def tcp_ports(self) -> tuple[int, ...]:
        """The loopback ports the stack listens on: the balancer's, and the emulators' if it runs them."""
        settings = self.settings
        if self.emulated:
            return settings.port, settings.default_port, settings.fallback_port
        return (settings.port,)

    def _spawn(self, command: list[str], env: dict[str, str] | None = None,
               service: str | None = None) -> subprocess.Popen:
        output = subprocess.DEVNULL if self.settings.quiet else None
        cgroups = self.settings.cgroups.get(service, ()) if service else ()

        def prepare_child() -> None:
            # A killed benchmark or test run must not leave its stack running.
            _stop_with_parent()
            for cgroup in cgroups:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                    procs.write(str(os.getpid()))

        return subprocess.Popen(command, env={**os.environ, **(env or {})},
                                stdout=output, stderr=output, start_new_session=True,
                                preexec_fn=prepare_child)

    def start(self) -> Stack:
        for directory in (self.shared_dir, self.socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            if self.settings.store == "redis":
                self.redis = RedisServer(self.run_dir / "redis", free_ports(1, avoid=self.tcp_ports)[0]).start(
                    lambda command: self._spawn(command, service="redis"))
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
        for port, fee in ((self.settings.default_port, "0.07"), (self.settings.fallback_port, "0.10")):
            self.processors.append(self._spawn(
                [sys.executable, "-m", "paycore.emulator", "--host", "127.0.0.1",
                 "--port", str(port), "--fee", fee, *self.settings.emulator_args]))
        for port, process in zip((self.settings.default_port, self.settings.fallback_port), self.processors):
            wait_for_tcp("127.0.0.1", port, process=process)

    def socket_path(self, index: int) -> str:
        return str(self.socket_dir / f"api-{index}.sock")

    def instance_shared_dir(self, index: int) -> Path:
        return self.shared_dir if self.store_url == "embedded" else self.shared_dir / f"host-{index}"

    def instance_data_dir(self, index: int) -> Path:
        """The journal and payments record, on disk: one per host."""
        data = self.run_dir / "data"
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
        if os.path.exists(self.socket_path(index)):
            os.unlink(self.socket_path(index))
        self.instances[index] = self._spawn([sys.executable, "-m", "paycore.service"], env,
                                            service=f"api{index}")
        wait_for_unix(self.socket_path(index), process=self.instances[index])

    def stop_instance(self, index: int, signum: int = signal.SIGTERM) -> int:
        process = self.instances.pop(index)
        return _stop(process, signum)

    def _start_balancer(self) -> None:
        self.balancer = self._spawn(
            [sys.executable, "-m", "paycore.service.balancer"],
            {"PAYCORE_BALANCER_LISTEN": f"127.0.0.1:{self.settings.port}",
             "PAYCORE_BALANCER_INSTANCES": ",".join(
                 self.handoff_path(index) for index in range(1, self.settings.instances + 1))},
            service="load-balancer")
        wait_for_tcp("127.0.0.1", self.settings.port, process=self.balancer)

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
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_shared_dir:
            shutil.rmtree(self.shared_dir, ignore_errors=True)

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


def _stop_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent goes (Linux prctl): make does
    not pass its SIGTERM on to `make run`, and a Stack's owner may be killed
    before it can stop what it started."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main() -> None:
    _stop_with_parent()
    run_dir = Path(os.environ.get("PAYCORE_RUN_DIR", REPO / "run"))
    stack = Stack(StackSettings(
        port=int(os.environ.get("PAYCORE_PORT", "9999")),
        default_url=os.environ.get("PROCESSOR_DEFAULT_URL"),
        fallback_url=os.environ.get("PROCESSOR_FALLBACK_URL"),
        run_dir=run_dir,
        store=os.environ.get("PAYCORE_STORE", "embedded"),
        **({"admin_token": os.environ["PAYCORE_ADMIN_TOKEN"]} if os.environ.get("PAYCORE_ADMIN_TOKEN") else {}),
    ))
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stack.start()
    processors = "emulated on 8001/8002" if stack.emulated else f"{stack.default_url}, {stack.fallback_url}"
    store = "embedded store" if stack.store_url == "embedded" else f"store {stack.store_url}"
    print(f"paycore: {stack.url} (processors {processors}; {store}); shared state, journals and "
          f"metrics sockets in {stack.shared_dir}; Ctrl-C stops everything", flush=True)
    print(f"paycore: to purge: curl -X POST -H 'Authorization: Bearer {stack.settings.admin_token}' "
          f"{stack.url}/purge-payments (PAYCORE_ADMIN_TOKEN sets the token)", flush=True)
    while not stopping:
        time.sleep(0.2)
    stack.stop()


if __name__ == "__main__":
    main()
