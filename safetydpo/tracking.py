"""MLflow in one place: where runs go, the parent run of a pipeline and its child runs.

A pipeline run is one MLflow parent run; every stage, expert and trial is a child run tagged
``safetydpo.stage=<name>``. Child runs are found again by that tag, so a re-run stage logs into
its old child run instead of adding a duplicate. Ray workers find the parent through
``$SAFETYDPO_PARENT_RUN_ID`` and the store through ``$MLFLOW_TRACKING_URI`` (see :func:`worker_env`).
Works against a tracking server (``http://...``) and a plain ``sqlite:///`` file alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from safetydpo import storage
from safetydpo.config import PROJECT_ROOT, REGISTERED_NAME, Config, dump_config

PARENT_ENV = "SAFETYDPO_PARENT_RUN_ID"
STAGE_TAG = "safetydpo.stage"


def _local_root(config: Config) -> Path | None:
    """The run root as an absolute local folder; None for a storage URI."""
    if storage.is_remote(config.run_root):
        return None
    return (PROJECT_ROOT / config.run_root.removeprefix("file://")).resolve()


def resolve_tracking_uri(config: Config) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file.

    The file is ``<run_root>/mlflow.db``, or ``<project>/runs/mlflow.db`` when the run root is a
    storage URI (sqlite needs a local file). Never MLflow's legacy ``./mlruns`` file store.
    """
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = _local_root(config) or PROJECT_ROOT / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def setup(config: Config) -> str:
    """Point MLflow at the config's store and experiment; returns the experiment id.

    A new experiment on a local store keeps its artifacts under ``<run_root>/mlartifacts``; on a
    tracking server the server decides (it proxies artifacts when started with ``--serve-artifacts``).
    """
    uri = resolve_tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    name = config.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        root = _local_root(config)
        location = None
        if root is not None and not uri.startswith(("http://", "https://")):
            location = (root / "mlartifacts").as_uri()
        with contextlib.suppress(MlflowException):  # created meanwhile by another process
            mlflow.create_experiment(name, artifact_location=location)
    return mlflow.set_experiment(name).experiment_id


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextmanager
def pipeline_run(config: Config, run_name: str | None = None) -> Iterator[Run]:
    """Open the parent run of a pipeline (config as params + ``config.yaml``) for the ``with`` body.

    With ``$SAFETYDPO_PARENT_RUN_ID`` set (a stage launched as its own job) that run is resumed
    instead, so separately launched stages nest under one parent. The variable is set for the body.
    """
    setup(config)
    parent_id = os.environ.get(PARENT_ENV)
    if parent_id:
        active = mlflow.start_run(run_id=parent_id)
    else:
        active = mlflow.start_run(run_name=run_name or config.name, tags={"safetydpo.config": config.name})
        mlflow.log_params(_flatten(config.model_dump(mode="json")))
        mlflow.log_text(dump_config(config), "config.yaml")
    with active:
        os.environ[PARENT_ENV] = active.info.run_id
        try:
            yield mlflow.get_run(active.info.run_id)
        finally:
            if parent_id:
                os.environ[PARENT_ENV] = parent_id
            else:
                os.environ.pop(PARENT_ENV, None)


def find_child_run(parent_id: str, name: str) -> Run | None:
    """The oldest live child run of ``parent_id`` tagged ``safetydpo.stage=name``, if any."""
    if "'" in name:
        raise ValueError(f"child run name {name!r} must not contain a quote")
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{STAGE_TAG}` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


@contextmanager
def child_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[Run]:
    """A child run named ``name`` under the active run, else under ``$SAFETYDPO_PARENT_RUN_ID``.

    Reuses an existing child of that parent with the same name (idempotent re-runs).
    """
    active = mlflow.active_run()
    parent_id = active.info.run_id if active else os.environ.get(PARENT_ENV)
    if not parent_id:
        raise RuntimeError(f"child_run({name!r}) needs an active MLflow run or ${PARENT_ENV}")
    all_tags = {STAGE_TAG: name, **(tags or {})}
    existing = find_child_run(parent_id, name)
    if existing is not None:
        run = mlflow.start_run(run_id=existing.info.run_id, nested=True, tags=all_tags)
    else:
        run = mlflow.start_run(
            run_name=name,
            nested=True,
            parent_run_id=parent_id,
            experiment_id=mlflow.get_run(parent_id).info.experiment_id,
            tags=all_tags,
        )
    with run:
        yield mlflow.get_run(run.info.run_id)


def worker_env() -> dict[str, str]:
    """Environment for Ray workers so they log to this process's store, under its active run."""
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    active = mlflow.active_run()
    if active is not None:
        env[PARENT_ENV] = active.info.run_id
    elif os.environ.get(PARENT_ENV):
        env[PARENT_ENV] = os.environ[PARENT_ENV]
    return env


def run_url(run: Run) -> str:
    """Where a person looks at ``run``: its UI page, or the ``mlflow ui`` command for a sqlite store."""
    uri = mlflow.get_tracking_uri()
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  then  http://127.0.0.1:5000/{page}"


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numbers (numpy and torch scalars included) to the active run."""
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params(dict(params))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_figure(figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact, e.g. ``plots/ip_by_category.png``."""
    mlflow.log_figure(figure, artifact_file)


def log_image(image: Any, artifact_file: str) -> None:
    """A PIL image or HxWxC array as an artifact, e.g. ``samples/hate_0.png``."""
    mlflow.log_image(image, artifact_file=artifact_file)


def register_lora(run_id: str, artifact_path: str, name: str, alias: str, tags: Mapping[str, str]) -> str:
    """Register the LoRA folder logged as ``artifact_path`` of run ``run_id`` as a new version of model
    ``name`` (created if new), point ``alias`` at it and tag it with its lineage; returns the version.

    A version is created from the artifact location (MLflow 3's ``register_model`` of a ``runs:/`` URI
    looks for a logged model, and a LoRA folder is plain artifacts). A name or alias that Serve's model
    ids and headers cannot carry is refused here, before anything is registered.
    """
    for what, value in (("registered model name", name), ("alias", alias)):
        if not re.fullmatch(REGISTERED_NAME, value):
            raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' and '-' (at most 128), "
                             "starting with a letter or digit")
    client = mlflow.MlflowClient()
    with contextlib.suppress(MlflowException):  # exists already
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags=dict(tags))
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def git_commit() -> str:
    """The project's git commit (``+dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def headline_tags(config: Config) -> str | None:
    """Tag the active (parent) run with the git commit and the champion's registered version; the version."""
    tags = {"safetydpo.git_commit": git_commit()}
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(config.tracking.registered_model, "champion")
    except MlflowException:
        version = None
    if version is not None:
        tags["safetydpo.model_version"] = str(version.version)
    mlflow.set_tags(tags)
    return str(version.version) if version is not None else None

