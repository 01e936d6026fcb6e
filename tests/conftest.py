"""Fixtures shared by every test module: a private Ray instance and a config that writes to tmp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from safetydpo.config import Config, build_config

pytest_plugins = ["cluster_testing"]  # the `local` fixture: a private cluster/local.py cluster


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A fresh 2-CPU Ray for the whole session (never a cluster $RAY_ADDRESS points at)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the session: creating one runs migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tmp_config(tmp_path: Path, mlflow_store: str, request: pytest.FixtureRequest) -> Config:
    """The default config, run root under ``tmp_path``, an MLflow experiment of this test's own."""
    return build_config({
        "name": "test",
        "run_root": str(tmp_path / "run"),
        "tracking": {"tracking_uri": mlflow_store, "experiment": request.node.nodeid},
    })
