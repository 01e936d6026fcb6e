"""A one-machine cluster: a Ray head and an MLflow tracking server, both on loopback.

    python cluster/local.py up|down|status [--run-root DIR] [--num-cpus N] [--ray-port P ...]

``up`` starts what is not already running and is safe to repeat; ``down`` stops exactly the
processes ``up`` started (each service runs in a session of its own, see
``safetydpo/localcluster.py``), never another Ray on the machine, and, like ``ray stop``, removes
Ray's record of the current cluster if it still names that head; ``status`` shows both.
State, logs and the MLflow store live in ``<run-root>/cluster/`` (default ``runs/cluster``).

Ray 2.60 token auth: ``ray start`` enables it only when a token exists or ``RAY_AUTH_MODE=token``
is set, so ``up`` creates ``~/.ray/auth_token`` if missing and starts the head in token mode.
Clients that name an address (``ray job submit``, ``ray.init(address=...)``) send the token only
with ``RAY_AUTH_MODE=token`` in their environment. Ray resolves ``--node-ip-address 127.0.0.1`` to
the machine's address and its gRPC ports listen on every interface (the token guards them); the
dashboard and MLflow bind 127.0.0.1 only. Ray processes inherit ``MLFLOW_TRACKING_URI``, so jobs
and their workers log to this MLflow server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from safetydpo import localcluster
from safetydpo.config import PROJECT_ROOT

HOST = "127.0.0.1"
STARTUP_TIMEOUT = "timed out during startup"  # how `ray start` says its node did not register in time
BIN = Path(sys.executable).parent  # the venv this script runs in: its `ray` and `mlflow`


class ServiceError(RuntimeError):
    """A service failed to start; the message says why and where its log is."""


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _check_free(ports: dict[str, int]) -> None:
    busy = [f"{name} port {port}" for name, port in ports.items() if _port_in_use(port)]
    if busy:
        raise ServiceError(f"{', '.join(busy)} already in use on {HOST}; pick others (see --help)")


def _wait_mlflow(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll the server's ``/health`` until it answers (about 13 s here); fail early if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"MLflow server exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer within {timeout_s:.0f} s; log {log}:\n{_tail(log)}")


def start_mlflow(cdir: Path, port: int) -> tuple[dict[str, Any], subprocess.Popen]:
    """Launch the MLflow server (sqlite store, proxied artifacts) without waiting for it."""
    log = cdir / "mlflow.log"
    # Server-side MLflow jobs (GenAI evaluation) are unused here and cost 7 extra processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{cdir / 'mlflow.db'}",
           "--artifacts-destination", str(cdir / "mlartifacts"), "--serve-artifacts"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    return {"sid": proc.pid, "url": f"http://{HOST}:{port}", "log": str(log)}, proc


def _ensure_token() -> None:
    """Create Ray's default token file (~/.ray/auth_token) unless a token is already available."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def address_file(temp_dir: str | None) -> Path:
    """Where ``ray start`` records the current cluster (``<temp dir>/ray_current_cluster``, by
    default /tmp/ray/...): ``ray.init()`` and ``serve run`` without an address connect to it."""
    from ray._common.utils import get_ray_address_file  # Ray's own rule (RAY_TMPDIR, TMPDIR, /tmp)

    return Path(get_ray_address_file(temp_dir))


def _read_record(path: Path) -> str | None:
    """The GCS address recorded in ``path``, None when there is none."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _names_head(recorded: str, entry: dict[str, Any]) -> bool:
    """Whether the recorded GCS address is this head's. An entry without that address (written by
    an older ``up``, or after a failed ``ray start``) has only the port to go by."""
    if "gcs_address" in entry:
        return recorded == entry["gcs_address"]
    return recorded.rpartition(":")[2] == entry["address"].rpartition(":")[2]


def forget_head(entry: dict[str, Any]) -> Path | None:
    """Remove Ray's current-cluster record if it names this (stopped) head; its path if removed.

    ``ray stop`` does this; without it ``ray.init()`` and ``serve run`` wait for the dead GCS.
    A record naming another head (a later ``ray start``), or one whose GCS answers, is left alone.
    """
    path = Path(entry.get("address_file") or address_file(entry.get("temp_dir")))
    recorded = _read_record(path)
    if recorded is None or not _names_head(recorded, entry):
        return None
    host, _, port = recorded.rpartition(":")
    if _port_in_use(int(port), host):
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return path


def start_ray(cdir: Path, args: argparse.Namespace, mlflow_url: str) -> tuple[dict[str, Any], int]:
    """Run ``ray start --head``, which returns once the head is up: (state entry, exit status).

    The entry is valid even when ``ray start`` failed, so whatever it left running can be stopped.
    It names Ray's current-cluster record and the GCS address ``ray start`` wrote there, so that
    ``down`` removes that record only while it still names this head.
    """
    _ensure_token()
    log = cdir / "ray-start.log"
    # Jobs' `python` is this venv's; every Ray process inherits the MLflow server's address.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": mlflow_url,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", HOST, "--port", str(args.ray_port),
           "--dashboard-host", HOST, "--dashboard-port", str(args.dashboard_port),
           "--ray-client-server-port", str(args.client_port),
           "--dashboard-agent-listen-port", str(args.agent_port),
           "--num-cpus", str(args.num_cpus), "--disable-usage-stats"]
    if args.temp_dir:
        cmd += ["--temp-dir", args.temp_dir]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    record = address_file(args.temp_dir)
    entry = {"sid": proc.pid, "address": f"{HOST}:{args.ray_port}",
             "dashboard_url": f"http://{HOST}:{args.dashboard_port}", "auth_mode": "token",
             "temp_dir": args.temp_dir, "address_file": str(record), "log": str(log)}
    exit_status = proc.wait(timeout=300)
    if exit_status == 0:
        entry["gcs_address"] = _read_record(record)  # the resolved address, e.g. <machine ip>:port
    return entry, exit_status


def _terminate(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``procs``, SIGKILL whatever is left after ``grace_s`` seconds."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + grace_s
    while any(localcluster.alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:
        if localcluster.alive(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def stop_service(sid: int, grace_s: float = 5.0) -> int:
    """Stop every process of session ``sid`` (and descendants); returns how many there were.

    Ray's own order: raylet first (its agents fate-share with it), GCS last.
    """
    procs = localcluster.service_processes(sid)
    names = {p.pid: _name(p) for p in procs}
    first = [p for p in procs if names[p.pid] == "raylet"]
    last = [p for p in procs if names[p.pid] == "gcs_server"]
    middle = [p for p in procs if p not in first and p not in last]
    for bucket in (first, middle, last):
        _terminate(bucket, grace_s)
    leftovers = localcluster.service_processes(sid)  # anything forked while shutting down
    _terminate(leftovers, 0.0)
    return len(procs)


def stop(service: str, entry: dict[str, Any]) -> tuple[int, Path | None]:
    """Stop ``service`` as recorded in ``entry`` and, for Ray, drop its record of the current cluster
    as ``ray stop`` would: (how many processes there were, the record's path if it was removed)."""
    count = stop_service(entry["sid"])
    return count, forget_head(entry) if service == "ray" else None


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _print_status(state: dict[str, Any]) -> bool:
    """Print each service; True when both run."""
    ok = True
    for service in ("ray", "mlflow"):
        entry = state.get(service)
        procs = localcluster.service_processes(entry["sid"]) if entry else []
        ok = ok and bool(procs)
        if not procs:
            print(f"{service:7s} stopped")
        elif service == "ray":
            print(f"ray     running ({len(procs)} processes)  dashboard {entry['dashboard_url']}  "
                  f"address {entry['address']}  log {entry['log']}")
        else:
            print(f"mlflow  running ({len(procs)} processes)  UI {entry['url']}  log {entry['log']}")
    return ok


def _print_next_steps(state: dict[str, Any]) -> None:
    excludes = json.dumps({"excludes": localcluster.RUNTIME_ENV_EXCLUDES})
    print(f"""
Submit the pipeline as a Ray job (from the project root):
  RAY_AUTH_MODE=token {BIN / 'ray'} job submit --address {state['ray']['dashboard_url']} --working-dir . \\
    --runtime-env-json '{excludes}' \\
    -- python jobs/pipeline.py --config jobs/configs/toy.yaml run_root={PROJECT_ROOT / 'runs' / 'toy'}
or run it here, where it joins this cluster: {BIN / 'python'} jobs/pipeline.py --config jobs/configs/toy.yaml
Runs show up in MLflow at {state['mlflow']['url']}""")


def up(args: argparse.Namespace) -> int:
    runs = Path(args.run_root).resolve()
    cdir = localcluster.state_path(runs).parent
    cdir.mkdir(parents=True, exist_ok=True)
    state = localcluster.read_state(runs)
    started: list[str] = []
    ray_up, mlflow_up = localcluster.running(state, "ray"), localcluster.running(state, "mlflow")
    mlflow_url = state["mlflow"]["url"] if mlflow_up else f"http://{HOST}:{args.mlflow_port}"
    needed = {} if ray_up else {"Ray GCS": args.ray_port, "dashboard": args.dashboard_port,
                                "Ray client": args.client_port, "dashboard agent": args.agent_port}
    if not mlflow_up:
        needed["MLflow"] = args.mlflow_port
    try:
        _check_free(needed)
        # Ray first, MLflow after: `ray start` gives its raylet only 30 s, so it gets the CPUs alone.
        if ray_up:
            print(f"Ray head already running at {state['ray']['address']}")
        else:
            state["ray"], exit_status = start_ray(cdir, args, mlflow_url)
            started.append("ray")
            localcluster.write_state(state, runs)
            if exit_status != 0 and STARTUP_TIMEOUT in _tail(Path(state["ray"]["log"])):
                # Ray gives its node 30 s to register, too little on a busy machine: try once more.
                print("ray start timed out (busy machine?); trying once more", file=sys.stderr)
                stop_service(state["ray"]["sid"])
                state["ray"], exit_status = start_ray(cdir, args, mlflow_url)
                localcluster.write_state(state, runs)
            if exit_status != 0:
                log = Path(state["ray"]["log"])
                raise ServiceError(f"ray start failed; log {log}:\n{_tail(log)}")
        if mlflow_up:
            print(f"MLflow already running at {mlflow_url}")
        else:
            state["mlflow"], mlflow_proc = start_mlflow(cdir, args.mlflow_port)
            started.append("mlflow")
            localcluster.write_state(state, runs)
            _wait_mlflow(f"{mlflow_url}/health", mlflow_proc, Path(state["mlflow"]["log"]), args.timeout)
    except (ServiceError, OSError, subprocess.SubprocessError) as err:
        for service in started:  # leave nothing half-started behind
            stop(service, state.pop(service))
        localcluster.write_state(state, runs)
        print(f"error: {err}", file=sys.stderr)
        return 1
    state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    localcluster.write_state(state, runs)
    _print_status(state)
    _print_next_steps(state)
    return 0


def down(args: argparse.Namespace) -> int:
    runs = Path(args.run_root).resolve()
    state = localcluster.read_state(runs)
    if not state:
        print(f"no local cluster recorded in {localcluster.state_path(runs)}")
        return 0
    for service in ("ray", "mlflow"):  # Ray first: its workers may still be logging to MLflow
        if service in state:
            count, record = stop(service, state[service])
            print(f"{service}: stopped {count} processes" if count else f"{service}: was not running")
            if record:
                print(f"{service}: removed {record}, which named this head")
    localcluster.state_path(runs).unlink()
    return 0


def status(args: argparse.Namespace) -> int:
    state = localcluster.read_state(Path(args.run_root).resolve())
    return 0 if _print_status(state) else 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--run-root", default=str(localcluster.DEFAULT_RUNS),
                   help="folder that holds cluster/ (state, logs, MLflow store); default: runs/")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs the Ray head offers")
    p.add_argument("--ray-port", type=int, default=_env_int("SAFETYDPO_RAY_PORT", 6379), help="GCS port")
    p.add_argument("--dashboard-port", type=int, default=_env_int("SAFETYDPO_DASHBOARD_PORT", 8265))
    p.add_argument("--client-port", type=int, default=_env_int("SAFETYDPO_RAY_CLIENT_PORT", 10001),
                   help="Ray Client server port")
    p.add_argument("--agent-port", type=int, default=_env_int("SAFETYDPO_RAY_AGENT_PORT", 52365),
                   help="dashboard agent HTTP port")
    p.add_argument("--mlflow-port", type=int, default=_env_int("SAFETYDPO_MLFLOW_PORT", 5000))
    p.add_argument("--temp-dir", default=os.environ.get("SAFETYDPO_RAY_TEMP_DIR"),
                   help="Ray session folder (default Ray's /tmp/ray); keep it short, sockets live there")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for MLflow to answer")
    args = p.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
