"""A private ``cluster/local.py`` cluster for tests: free ports, a tmp run root and a short Ray temp dir, so a
cluster the user runs on the default ports (or Ray's /tmp/ray) is never touched; ``local`` always stops it."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from safetydpo.config import PROJECT_ROOT

Runner = Callable[[str], subprocess.CompletedProcess]


def _load_cluster_local() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluster_local", PROJECT_ROOT / "cluster" / "local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cluster_local = _load_cluster_local()


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def cluster_flags(run_root: Path, ports: dict[str, int], num_cpus: int = 1) -> list[str]:
    return ["--run-root", str(run_root), "--num-cpus", str(num_cpus), "--timeout", "300",
            "--ray-port", str(ports["ray"]), "--dashboard-port", str(ports["dashboard"]),
            "--mlflow-port", str(ports["mlflow"]), "--client-port", str(ports["client"]),
            "--agent-port", str(ports["agent"])]


def runner(flags: list[str], env: dict[str, str] | None = None) -> Runner:
    """``cluster/local.py <command> <flags>`` as a function of the command."""
    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(PROJECT_ROOT / "cluster" / "local.py"), command, *flags],
                              env=env, capture_output=True, text=True, timeout=600)

    return run


def private_ports() -> dict[str, int]:
    return dict(zip(["ray", "dashboard", "mlflow", "client", "agent"], free_ports(5), strict=True))


@pytest.fixture
def local(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Runner, dict[str, int]]]:
    """Run ``cluster/local.py <command>`` on private ports (CPUs: the ``num_cpus`` marker, else 1); always
    ``down`` afterwards."""
    marker = request.node.get_closest_marker("num_cpus")
    ports = private_ports()
    temp_dir = tempfile.mkdtemp(prefix="sdr-", dir="/tmp")  # short: Ray's socket paths live there
    run = runner([*cluster_flags(tmp_path, ports, marker.args[0] if marker else 1), "--temp-dir", temp_dir])
    yield run, ports
    run("down")
    shutil.rmtree(temp_dir, ignore_errors=True)
