"""cluster/local.py for real: Ray head + MLflow server, a `ray job submit`, idempotent up, clean down.

Uses a tmp run root, free ports and a private Ray temp dir, so a cluster the user runs on the
default ports (or Ray's /tmp/ray) is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import psutil
import pytest

from safetydpo import localcluster
from safetydpo.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
JOB = '''
import os, mlflow
mlflow.set_experiment("cluster-test")
with mlflow.start_run(run_name="from-a-ray-job") as run:
    mlflow.log_metric("answer", 42)
    mlflow.log_text("hello", "hello.txt")
print("TRACKING", os.environ["MLFLOW_TRACKING_URI"], "RUN_ID", run.info.run_id)
'''

# A driver run as plain `python`, which imports Ray before it reads the state file.
JOIN = '''
import os, sys
from pathlib import Path
import ray
from safetydpo import localcluster
print("JOINED", localcluster.join_env(False, Path(sys.argv[1])), os.environ["MLFLOW_TRACKING_URI"])
ray.init()
print("CPUS", ray.cluster_resources()["CPU"])
'''


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Callable[[str], subprocess.CompletedProcess], dict[str, int]]]:
    """Run ``cluster/local.py <command>`` on private ports; always ``down`` afterwards."""
    ports = dict(zip(["ray", "dashboard", "mlflow", "client", "agent"], _free_ports(5), strict=True))
    temp_dir = tempfile.mkdtemp(prefix="sdr-", dir="/tmp")  # short: Ray's socket paths live there
    flags = ["--run-root", str(tmp_path), "--num-cpus", "1", "--temp-dir", temp_dir, "--timeout", "300",
             "--ray-port", str(ports["ray"]), "--dashboard-port", str(ports["dashboard"]),
             "--mlflow-port", str(ports["mlflow"]), "--client-port", str(ports["client"]),
             "--agent-port", str(ports["agent"])]

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(PROJECT_ROOT / "cluster" / "local.py"), command, *flags],
                              capture_output=True, text=True, timeout=600)

    yield run, ports
    run("down")
    shutil.rmtree(temp_dir, ignore_errors=True)


def _listen_hosts(port: int) -> set[str]:
    listening = (c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    return {c.laddr.ip for c in listening if c.laddr.port == port}


def test_up_submit_idempotent_up_and_clean_down(local, tmp_path: Path) -> None:
    run, ports = local
    up = run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "ray job submit" in up.stdout
    state = localcluster.read_state(tmp_path)
    assert localcluster.running(state, "ray") and localcluster.running(state, "mlflow")
    mlflow_url, dashboard_url = state["mlflow"]["url"], state["ray"]["dashboard_url"]
    assert mlflow_url == f"http://127.0.0.1:{ports['mlflow']}"
    assert _listen_hosts(ports["mlflow"]) == {"127.0.0.1"}
    assert _listen_hosts(ports["dashboard"]) == {"127.0.0.1"}

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "log_run.py").write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard_url, "--working-dir", str(job_dir),
         "--", "python", "log_run.py"],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    found = re.search(r"TRACKING (\S+) RUN_ID (\w+)", submit.stdout)
    assert found, submit.stdout
    assert found.group(1) == mlflow_url  # the job inherited the cluster's tracking server
    client = mlflow.MlflowClient(tracking_uri=mlflow_url)
    logged = client.get_run(found.group(2))
    assert logged.data.metrics["answer"] == 42
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    hello = client.download_artifacts(logged.info.run_id, "hello.txt", str(tmp_path))
    assert Path(hello).read_text() == "hello"

    joined = subprocess.run([sys.executable, "-c", JOIN, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert f"'MLflow {mlflow_url}'] {mlflow_url}" in joined.stdout and "CPUS 1.0" in joined.stdout

    again = run("up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "MLflow already running" in again.stdout and "Ray head already running" in again.stdout
    assert localcluster.read_state(tmp_path)["ray"]["sid"] == state["ray"]["sid"]
    assert run("status").returncode == 0

    ours = [p for s in ("ray", "mlflow") for p in localcluster.service_processes(state[s]["sid"])]
    assert len(ours) > 5
    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert [p.pid for p in ours if localcluster.alive(p)] == []
    assert not localcluster.state_path(tmp_path).exists()
    assert run("status").returncode == 1


def test_up_refuses_a_busy_port(local, tmp_path: Path) -> None:
    run, ports = local
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["mlflow"]))
        busy.listen()
        up = run("up")
    assert up.returncode == 1
    assert f"MLflow port {ports['mlflow']} already in use" in up.stderr
    assert localcluster.read_state(tmp_path) == {}
