"""The package as a user installs it, away from the source tree: the wheel
built as the Dockerfile builds it, and a plain `pip install .`, each in a
fresh virtualenv outside the checkout, run the production topology (the load
balancer, two instances, emulated processors) with a clean environment and
nothing of the checkout importable; payments posted, the summary checked."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningStack, call
from test_crash_safety import assert_exactly_once
from test_make_run import start  # noqa: F401 - the fixture
from test_service import accept_all, as_summary

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300
PAYMENTS = 200


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (instruction, arguments), lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction == "FROM":
            stages.append([])
        elif instruction and not instruction.startswith("#") and stages:
            stages[-1].append((instruction, arguments.strip()))
    return stages


def checkout_files(*paths: str) -> list[str]:
    """What a clone of the checkout holds under paths (files to be committed included)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
                            cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def copy_checkout(destination: Path, *paths: str) -> Path:
    for name in checkout_files(*paths):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, destination / name)
    return destination


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    """Only the virtualenv's bin ahead of the system's: no PYTHONPATH, no user site."""
    home.mkdir(exist_ok=True)
    return {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path


def run_pip_steps(stage: list[tuple[str, str]], cwd: Path, env: dict[str, str], wheels: Path) -> None:
    """The stage's RUN instructions that call pip, as written, with /wheels here."""
    steps = [arguments for instruction, arguments in stage if instruction == "RUN" and "pip " in arguments]
    assert steps
    for command in steps:
        command = re.sub(r"(?<![\w/.-])/wheels(?=[/\s]|$)", str(wheels), command)
        assert not re.search(r"(?<![\w/.-])/wheels", command), command
        subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=True, timeout=BUILD_TIMEOUT_S)


def install_as_the_dockerfile_does(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    build, runtime = dockerfile_stages()
    sources = [path for instruction, arguments in build if instruction == "COPY"
               for path in arguments.split()[:-1]]
    assert "pyproject.toml" in sources
    context = copy_checkout(tmp_path / "context", *sources)
    wheels = tmp_path / "wheels"
    builder = fresh_venv(tmp_path / "builder")
    run_pip_steps(build, context, clean_env(builder, tmp_path / "home"), wheels)
    venv = fresh_venv(tmp_path / "venv")
    env = clean_env(venv, tmp_path / "home")
    run_pip_steps(runtime, tmp_path, env, wheels)
    return venv, env


def install_with_pip_install_dot(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    checkout = copy_checkout(tmp_path / "checkout", ".")
    venv = fresh_venv(tmp_path / "venv")
    env = clean_env(venv, tmp_path / "home")
    subprocess.run(["pip", "install", "--quiet", "."], cwd=checkout, env=env, check=True,
                   timeout=BUILD_TIMEOUT_S)
    shutil.rmtree(checkout)
    return venv, env


@pytest.mark.parametrize("install", [install_as_the_dockerfile_does, install_with_pip_install_dot],
                         ids=["wheel built as the Dockerfile builds it", "pip install ."])
def test_the_installed_package_runs_the_production_topology(tmp_path, start, install):  # noqa: F811
    venv, env = install(tmp_path)
    python = str(venv / "bin" / "python")
    imported = subprocess.run(
        [python, "-c", "import sys, paycore, paycore.service.store, paycore.service.balancer, "
                       "paycore.emulator, paycore.core.ledger_tail\n"
                       "print(paycore.__file__); print(paycore.service.store.__file__); print(*sys.path, sep='\\n')"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    imported = imported.stdout.splitlines()
    assert all(path.startswith(str(venv)) for path in imported[:2]), imported
    assert [path for path in imported[2:] if path.startswith(str(REPO))] == []

    live = RunningStack(start(python=python, base_env=env))
    ids = accept_all(live, PAYMENTS)
    assert_exactly_once(live, ids)
    processors = as_summary(live.processors_summary())
    assert processors["default"]["totalRequests"] + processors["fallback"]["totalRequests"] == PAYMENTS
    assert call(live.client(), "GET", "/payments-summary")[1] == processors
