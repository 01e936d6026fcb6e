"""What every job entrypoint shares: ``--config FILE [key.sub=value ...]`` and joining Ray.

A job adds its own flags to :func:`parser`, calls :func:`load`, then runs its stages inside
:func:`session` (local cluster, MLflow parent run, Ray). Relative paths in a config
resolve against the project root, so ``run_root: runs/toy`` means the same folder whatever the
current directory is (under ``ray job submit`` the project root is the uploaded working dir: pass
an absolute ``run_root=...`` or a storage URI there).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Run

from safetydpo import localcluster, tracking
from safetydpo.config import PROJECT_ROOT, Config, ConfigError, load_config

# (section, field) of every config value that names a local file or folder.
_PATH_FIELDS = (
    ("data", "path"),
    ("eval", "q16_prompts_path"),
    ("eval", "prompts_path"),
    ("serve", "lora_path"),
)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` and positional ``key.sub=value`` overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/toy.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, YAML values: dpo.beta=2500 data.categories=[Hate,Sexual]")
    return p


def load(p: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The config named by ``args``; a bad file, key or value exits with the message (status 2)."""
    try:
        return resolve_paths(load_config(args.config, args.overrides))
    except ConfigError as err:
        p.error(str(err))


def resolve_local(path: str) -> str:
    """``path`` made absolute against the project root unless it is a URI, ``hf:`` id or absolute."""
    if "://" in path or path.startswith("hf:") or Path(path).is_absolute():
        return path
    return str(PROJECT_ROOT / path)


def resolve_paths(config: Config) -> Config:
    """Make the run root and every local path field of ``config`` absolute (in place)."""
    config.run_root = resolve_local(config.run_root)
    for section, field in _PATH_FIELDS:
        value = getattr(getattr(config, section), field)
        if value is not None:
            setattr(getattr(config, section), field, resolve_local(value))
    return config


def init_ray(runtime_env: dict[str, Any] | None = None) -> bool:
    """Join ``$RAY_ADDRESS`` (set by ``ray job submit`` or ``localcluster.join_env``), else start a
    private in-process Ray, never a stray cluster by accident. Call it inside ``tracking.pipeline_run``:
    every task and actor gets ``tracking.worker_env()`` (plus ``runtime_env``). Returns False when Ray
    was already initialised (nothing to shut down).
    """
    if ray.is_initialized():
        return False
    # A submitted job's runtime_env may set the same variables; let this driver's values win.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    # A job log a person can follow: this driver logs Ray Data's progress once a minute; workers (Ray Train's
    # dataset shards, search trials) log neither bars nor Ray Data's per-execution INFO lines, since each
    # training epoch is one execution and would flood the log. The stages print their own lines, and the
    # parent run's MLflow URL is printed once by the pipeline, not by every child run as it ends.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")
    # MLflow's telemetry thread sets and unsets a variable of os.environ while other threads iterate it (requests
    # does, for proxies): a worker died of that KeyError in a demo run (2026-12-07). A cluster job has no business
    # phoning home either; setting the variable yourself turns it back on.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    quiet = {name: os.environ.get(name, value)
             for name, value in (("RAY_DATA_DISABLE_PROGRESS_BARS", "1"), ("RAY_DATA_LOG_LEVEL", "WARNING"),
                                 ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"))}
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             runtime_env={**(runtime_env or {}), "env_vars": tracking.worker_env() | quiet})
    return True


@contextmanager
def session(config: Config, run_name: str | None = None,
            runtime_env: dict[str, Any] | None = None) -> Iterator[Run]:
    """Around a job's stages: join the local cluster when one runs, open the MLflow parent run (or
    nest under ``$SAFETYDPO_PARENT_RUN_ID``), join or start Ray; shut down only the Ray it started."""
    joined = localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    with tracking.pipeline_run(config, run_name=run_name) as run:
        print(f"MLflow run {run.info.run_id} at {tracking.resolve_tracking_uri(config)}", flush=True)
        started = init_ray(runtime_env)
        where = os.environ.get("RAY_ADDRESS") or "in-process"
        print(f"Ray: {where}" + (f" (local cluster: {', '.join(joined)})" if joined else ""), flush=True)
        try:
            yield run
        finally:
            if started:
                ray.shutdown()
