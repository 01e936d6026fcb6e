"""jobs/pipeline.py end to end with the Ray smoke stage: a worker logs into the parent's child run; the deploy
stage skips a Ray that lives in the job's process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow

from safetydpo import tracking
from safetydpo.config import PROJECT_ROOT


def test_pipeline_runs_the_smoke_stage_and_a_worker_logs_the_child_run(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", tracking.PARENT_ENV)}
    done = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/toy.yaml", "--stages", "ray-smoke,deploy",
         f"run_root={tmp_path / 'run'}", f"tracking.tracking_uri={store}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"run root\s+{tmp_path / 'run'}\n", done.stdout)
    assert "deploy: skipped, Ray runs in this process" in done.stdout  # no cluster would keep Serve up
    parent_id = re.search(r"MLflow run\s+(\w+)", done.stdout).group(1)

    mlflow.set_tracking_uri(store)
    child = tracking.find_child_run(parent_id, "ray-smoke")
    assert child is not None
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.metrics["cluster/cpus"] >= 1
    assert child.data.metrics["data/rows"] == 10_000
    assert mlflow.get_run(parent_id).data.params["name"] == "toy"
