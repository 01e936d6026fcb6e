"""cluster/local.py for real: Ray head + MLflow server, a `ray job submit`, idempotent up, clean down.

Uses a tmp run root, free ports and a private Ray temp dir (``--temp-dir``, or ``RAY_TMPDIR`` where
Ray's default one is under test), so a cluster the user runs on the default ports (or Ray's /tmp/ray)
is never touched. Every process a test starts runs in a session of its own and is stopped by it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
from cluster_testing import Runner, cluster_flags, cluster_local, free_ports, private_ports, runner

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

# What user code without an address does: connect to Ray's current-cluster record, else start a Ray.
BARE_INIT = '''
import ray
ray.init()
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
'''
STARTED_LOCAL = "Started a local Ray instance"


@pytest.fixture
def ray_default_env() -> Iterator[dict[str, str]]:
    """An environment without ``RAY_ADDRESS`` whose Ray default temp dir (``$RAY_TMPDIR/ray``, else
    /tmp/ray) is private: ``ray start`` without ``--temp-dir`` records the current cluster there and a
    bare ``ray.init()`` reads it from there, as on a user's machine, without touching the user's."""
    root = tempfile.mkdtemp(prefix="sdt-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    yield {**env, "RAY_TMPDIR": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def local_default_temp(tmp_path: Path, ray_default_env: dict[str, str]) -> Iterator[Runner]:
    """``cluster/local.py`` on private ports with Ray's default temp dir (as ``make cluster-up``)."""
    run = runner(cluster_flags(tmp_path, private_ports()), env=ray_default_env)
    yield run
    run("down")


@contextlib.contextmanager
def _session(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` from the project root in a session of its own, output to ``log``; afterwards stop
    every process of that session (the local Ray it started included) and nothing else."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        cluster_local.stop_service(proc.pid)
        proc.wait(timeout=30)


def _wait_for_output(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until ``text`` shows in ``log``; fail if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} (exit {proc.poll()}) within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


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
    record = Path(state["ray"]["address_file"])  # Ray's current-cluster record, in --temp-dir here
    assert record.read_text().strip() == state["ray"]["gcs_address"]
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
    assert not record.exists()
    assert run("status").returncode == 1


def test_down_forgets_its_head_so_ray_init_and_serve_run_start_afresh(
    local_default_temp: Runner, ray_default_env: dict[str, str], tmp_path: Path
) -> None:
    """The stale record made a bare ``ray.init()`` and ``serve run`` wait for the dead GCS forever."""
    run, env = local_default_temp, ray_default_env
    record = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    up = run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    head = localcluster.read_state(tmp_path)["ray"]
    assert head["address_file"] == str(record)
    assert record.read_text().strip() == head["gcs_address"]  # what a bare ray.init() joins now
    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"removed {record}" in down.stdout and not record.exists()

    init_log = tmp_path / "init.log"
    with _session([sys.executable, "-c", BARE_INIT], env, init_log) as init:
        with contextlib.suppress(subprocess.TimeoutExpired):
            init.wait(timeout=120)
        output = init_log.read_text(errors="replace")
        assert init.returncode == 0, f"bare ray.init() (exit {init.returncode}):\n{output[-3000:]}"
    assert STARTED_LOCAL in output and f"GCS {head['gcs_address']}" not in output

    # The README's command, from the project root: it must get as far as starting its own Ray.
    serve_log = tmp_path / "serve.log"
    with _session([str(BIN / "serve"), "run", "serve/config.yaml"], env, serve_log) as serve:
        _wait_for_output(serve_log, STARTED_LOCAL, serve, timeout_s=120)


def _record(tmp_path: Path, recorded: str) -> Path:
    path = tmp_path / "ray_current_cluster"
    path.write_text(recorded)
    return path


def test_down_forgets_only_a_record_of_its_own_dead_head(tmp_path: Path) -> None:
    ours, other = free_ports(2)
    entry = {"address": f"127.0.0.1:{ours}", "gcs_address": f"127.0.0.1:{ours}"}

    kept = _record(tmp_path, f"127.0.0.1:{other}")  # another `ray start` on the machine since
    assert cluster_local.forget_head({**entry, "address_file": str(kept)}) is None and kept.exists()

    with socket.socket() as gcs:  # the record names our address, but a GCS answers there
        gcs.bind(("127.0.0.1", ours))
        gcs.listen()
        kept = _record(tmp_path, f"127.0.0.1:{ours}")
        assert cluster_local.forget_head({**entry, "address_file": str(kept)}) is None and kept.exists()

    stale = _record(tmp_path, f"127.0.0.1:{ours}")
    assert cluster_local.forget_head({**entry, "address_file": str(stale)}) == stale and not stale.exists()

    # A state file written before `up` kept the GCS address: the port decides.
    legacy = {"address": f"127.0.0.1:{ours}", "temp_dir": str(tmp_path)}
    kept = _record(tmp_path, f"127.0.0.1:{other}")
    assert cluster_local.forget_head(legacy) is None and kept.exists()
    stale = _record(tmp_path, f"127.0.0.1:{ours}")
    assert cluster_local.forget_head(legacy) == stale and not stale.exists()


def test_up_refuses_a_busy_port(local, tmp_path: Path) -> None:
    run, ports = local
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["mlflow"]))
        busy.listen()
        up = run("up")
    assert up.returncode == 1
    assert f"MLflow port {ports['mlflow']} already in use" in up.stderr
    assert localcluster.read_state(tmp_path) == {}
