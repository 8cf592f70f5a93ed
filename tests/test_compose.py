"""docker-compose.yml keeps the deployment rules of SPEC §3."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

from cgroups import compose_limits, memory_bytes  # noqa: E402

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def instances(services: dict) -> dict[str, dict]:
    """The service instances (the load balancer runs from the same image)."""
    return {name: service for name, service in services.items()
            if "PAYCORE_INSTANCE" in service.get("environment", {})}


def test_budget_within_one_and_a_half_cpu_and_350_mb():
    limits = compose_limits(COMPOSE)
    assert len(limits) >= 3
    assert sum(limit.cpus for limit in limits) <= 1.5
    assert sum(limit.memory_bytes for limit in limits) <= memory_bytes("350MB")


def test_load_balancer_on_9999_in_front_of_two_instances(compose):
    services = compose["services"]
    balancer = services["load-balancer"]
    assert balancer["command"] == ["python", "-m", "paycore.service.balancer"]
    assert balancer["environment"]["PAYCORE_BALANCER_LISTEN"] == ":9999"
    assert any(str(port).split(":")[0] == "9999" for port in balancer["ports"])
    api = instances(services)
    assert len(api) >= 2
    assert set(api) <= set(balancer["depends_on"])
    # Each instance's hand-off socket is one the balancer hands connections to,
    # on a volume both mount.
    handed_to = balancer["environment"]["PAYCORE_BALANCER_INSTANCES"].split(",")
    listens = [instance["environment"]["PAYCORE_LISTEN"] for instance in api.values()]
    assert sorted(f"handoff:{path}" for path in handed_to) == sorted(listens)
    for name, instance in api.items():
        assert set(balancer["volumes"]) & set(instance["volumes"]), name


def test_no_host_mode_privileged_or_replicas(compose):
    for name, service in compose["services"].items():
        assert service.get("network_mode") in (None, "bridge"), name
        assert not service.get("privileged", False), name
        assert "replicas" not in service.get("deploy", {}), name
        assert "limits" in service["deploy"]["resources"], name


def test_bridge_networks_and_the_processors_network_is_external(compose):
    networks = compose["networks"]
    assert networks["payment-processor"] == {"external": True}
    for name, network in networks.items():
        if name != "payment-processor":
            assert network.get("driver", "bridge") == "bridge", name
    for name, instance in instances(compose["services"]).items():
        assert "payment-processor" in instance["networks"], name


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_every_container_log_is_rotated(compose):
    """What a service writes over months is bounded: Docker's json-file driver
    keeps a container's whole log unless told a size."""
    for name, service in compose["services"].items():
        logging = service.get("logging", {})
        assert logging.get("driver") in ("json-file", "local"), name
        options = logging.get("options", {})
        assert memory_bytes(options["max-size"]) <= memory_bytes("50MB"), name
        assert 1 <= int(options["max-file"]) <= 5, name


def test_docker_compose_accepts_the_file():
    checked = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_what_must_survive_lives_on_a_disk_volume_with_its_sync_policy(compose):
    """The journal and the payments record outlive the containers on a named
    volume that is not tmpfs; the instances sync what they promise."""
    data_volumes = set()
    for name, instance in instances(compose["services"]).items():
        environment = instance["environment"]
        assert environment["PAYCORE_JOURNAL_SYNC"] == "1", name
        mounts = dict(volume.split(":")[::-1] for volume in instance["volumes"])
        data_volumes.add(mounts[environment["PAYCORE_DATA_DIR"]])
    (data,) = data_volumes  # one record for the host, shared by its instances
    assert (compose["volumes"][data] or {}).get("driver_opts", {}).get("type") != "tmpfs"
