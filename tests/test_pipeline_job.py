"""The pipeline's deploy stage as a Ray job: `ray job submit` to a local cluster deploys the Serve app, which
answers over HTTP after the job has ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cluster_testing import free_ports

from safetydpo import localcluster
from safetydpo.config import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.num_cpus(2)]

BIN = Path(sys.executable).parent


@pytest.mark.timeout(900)
def test_submitted_pipeline_deploys_serve_that_outlives_the_job(local, tmp_path: Path) -> None:
    run, ports = local
    up = run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    (serve_port,) = free_ports(1)
    runtime_env = json.dumps({"excludes": localcluster.RUNTIME_ENV_EXCLUDES})
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
         "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
         "python", "jobs/pipeline.py", "--config", "jobs/configs/toy.yaml", "--stages", "deploy",
         f"run_root={tmp_path / 'run'}", f"serve.port={serve_port}", "tracking.experiment=pipeline-job"],
        cwd=PROJECT_ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage deploy: done" in done.stdout
    assert f"Serve        http://127.0.0.1:{serve_port}" in done.stdout  # the job's closing lines say where

    with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/v1/models", timeout=60) as reply:
        models = json.loads(reply.read())
    merged = next(m for m in models["data"] if m["id"] == "merged")
    assert merged["ready"] is False  # deployed before any merge exists: listed, not ready
