"""The one-machine cluster of ``cluster/local.py``: its state file and which of its processes live.

``cluster/local.py up`` starts each service (Ray head, MLflow server) as the leader of a new
session and records the session id in ``<runs>/cluster/state.json``. Every process of a service
shares that session id, except Ray job drivers, which Ray starts in sessions of their own under
the job supervisor; so a service's processes are its session plus all their descendants.
Job entrypoints read the same file to join the cluster when run as plain ``python jobs/...``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import psutil

from safetydpo import storage
from safetydpo.config import PROJECT_ROOT

DEFAULT_RUNS = PROJECT_ROOT / "runs"
# What `ray job submit --working-dir .` must not upload (gitignore-style, relative to the project).
RUNTIME_ENV_EXCLUDES = [".venv", "runs", ".git", "mlruns", "__pycache__", ".ruff_cache", ".pytest_cache"]


def state_path(runs: Path = DEFAULT_RUNS) -> Path:
    return runs / "cluster" / "state.json"


def read_state(runs: Path = DEFAULT_RUNS) -> dict[str, Any]:
    """The recorded services, ``{}`` when none were started."""
    path = state_path(runs)
    return storage.read_json(str(path)) if path.exists() else {}


def write_state(state: dict[str, Any], runs: Path = DEFAULT_RUNS) -> None:
    storage.write_json(str(state_path(runs)), state)


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs; a zombie (exited, not yet reaped) does not."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def service_processes(sid: int) -> list[psutil.Process]:
    """Live processes of the session ``sid`` and all their descendants (zombies count as gone)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            in_session = os.getsid(proc.pid) == sid
        except OSError:
            continue
        if in_session and alive(proc):
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in proc.children(recursive=True) if alive(child))
    return list(found.values())


def running(state: dict[str, Any], service: str) -> bool:
    """Whether ``service`` ("ray" or "mlflow") of ``state`` still has processes."""
    entry = state.get(service)
    return bool(entry) and bool(service_processes(entry["sid"]))


def _set_auth_mode(mode: str) -> None:
    """Set ``RAY_AUTH_MODE`` for this process. Ray reads it once, at ``import ray``, so re-read it
    the way Ray's own auto-connect path does (no public API switches it later)."""
    os.environ["RAY_AUTH_MODE"] = mode
    from ray._raylet import Config

    Config.initialize("")


def join_env(tracking_uri_configured: bool, runs: Path = DEFAULT_RUNS) -> list[str]:
    """Point this process at the local cluster if one runs and nothing else is configured.

    Sets ``RAY_ADDRESS`` and ``RAY_AUTH_MODE`` (clients naming an address must opt in to token auth)
    unless ``RAY_ADDRESS`` is set, and ``MLFLOW_TRACKING_URI`` unless a tracking URI is configured
    or already in the environment. Returns what it joined, for the log.
    """
    state = read_state(runs)
    joined = []
    if "RAY_ADDRESS" not in os.environ and running(state, "ray"):
        os.environ["RAY_ADDRESS"] = state["ray"]["address"]
        if "RAY_AUTH_MODE" not in os.environ:
            _set_auth_mode(state["ray"]["auth_mode"])
        joined.append(f"Ray {state['ray']['address']}")
    if not tracking_uri_configured and "MLFLOW_TRACKING_URI" not in os.environ and running(state, "mlflow"):
        os.environ["MLFLOW_TRACKING_URI"] = state["mlflow"]["url"]
        joined.append(f"MLflow {state['mlflow']['url']}")
    return joined
