"""The pipeline as Ray jobs on one local cluster (``cluster/local.py``, ``ray job submit``), under faults.

Two jobs with different run roots run at once. Job B's driver is SIGKILLed once one expert of B has finished
and the other has a checkpoint; B is then submitted again. Checks: the resubmission reuses B's pairs and
finished expert and resumes the other from its checkpoint; B's LoRAs equal A's bit for bit (an uninterrupted
run of the same config); neither job wrote into the other's run root or under the other's MLflow parent run;
no file a later stage reads is left partial.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import load_file

from safetydpo import layout, localcluster, tracking

pytestmark = [pytest.mark.slow, pytest.mark.num_cpus(2)]

BIN = Path(sys.executable).parent
EXPERIMENT = "pipeline-faults"
MAX_STEPS = 24
OVERRIDES = [
    "data.categories=[Hate,Violence]", "data.toy_pairs_per_category=8", "generation.num_inference_steps=4",
    "generation.num_actors=1", "experts.max_concurrent=1", "experts.checkpoint_every=4",
    f"dpo.max_steps={MAX_STEPS}", "dpo.batch_size=4", f"tracking.experiment={EXPERIMENT}",
]


def _submit(dashboard: str, run_root: Path, submission_id: str) -> None:
    entrypoint = ["python", "jobs/pipeline.py", "--config", "jobs/configs/toy.yaml", "--stages", "generate,experts",
                  f"run_root={run_root}", *OVERRIDES]
    runtime_env = json.dumps({"excludes": localcluster.RUNTIME_ENV_EXCLUDES})
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", submission_id, "--no-wait",
         "--working-dir", ".", "--runtime-env-json", runtime_env, "--", *entrypoint],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _job(dashboard: str, command: str, submission_id: str) -> str:
    done = subprocess.run([str(BIN / "ray"), "job", command, "--address", dashboard, submission_id],
                          env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def _wait_status(dashboard: str, submission_id: str, statuses: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # `ray job status` says "Status for job 'x': RUNNING", or "Job 'x' succeeded / failed / was stopped".
        found = re.search(r"Status for job '\S+': (\w+)|Job '\S+' (succeeded|failed|was stopped)",
                          _job(dashboard, "status", submission_id))
        status = next((g for g in (found.groups() if found else ()) if g), "").upper().removeprefix("WAS ")
        if status in statuses:
            return status
        time.sleep(3)
    pytest.fail(f"job {submission_id} not {statuses} within {timeout_s:.0f} s:\n"
                f"{_job(dashboard, 'logs', submission_id)[-3000:]}")


def _registered_step(run_root: Path, slug: str) -> int | None:
    for snapshot in (run_root / "experts" / "_ray").glob(f"{slug}-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text() or "{}").get("latest_checkpoint_result")
        except (json.JSONDecodeError, OSError):  # being rewritten
            return None
        if latest:
            return int(latest["metrics"]["step"])
    return None


def _driver(run_root: Path) -> psutil.Process:
    """The job's driver: the `jobs/pipeline.py` process with this run root on its command line."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("jobs/pipeline.py" in part for part in cmdline) and f"run_root={run_root}" in cmdline:
            return proc
    raise LookupError(run_root)


def _kill_when_half_done(run_root: Path, timeout_s: float = 900) -> dict:
    """SIGKILL the driver once one expert has finished and the other has a registered checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = [s for s in ("hate", "violence") if (run_root / "experts" / s / layout.EXPERT_JSON).exists()]
        if len(finished) == 1:
            other = "violence" if finished == ["hate"] else "hate"
            step = _registered_step(run_root, other)
            if step is not None and step < MAX_STEPS:
                _driver(run_root).kill()
                return {"finished": finished[0], "resuming": other, "step": step}
        if len(finished) == 2:
            pytest.fail("both experts finished before the driver could be killed: give them more steps")
        time.sleep(0.2)
    pytest.fail(f"no half-finished experts stage under {run_root} within {timeout_s:.0f} s")


def _partial_files(run_root: Path) -> list[Path]:
    """Temporary files of atomic writes or staged folders: what an interrupted write would leave."""
    return [p for p in run_root.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def _lora(run_root: Path, slug: str) -> dict[str, torch.Tensor]:
    return load_file(run_root / "experts" / slug / layout.LORA_WEIGHTS)


@pytest.mark.timeout(2400)
def test_killed_driver_resubmitted_redoes_only_unfinished_work_beside_another_run(local, tmp_path: Path) -> None:
    run, ports = local
    up = run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    dashboard, mlflow_url = f"http://127.0.0.1:{ports['dashboard']}", f"http://127.0.0.1:{ports['mlflow']}"
    root_a, root_b = tmp_path / "run-a", tmp_path / "run-b"

    _submit(dashboard, root_a, "run-a")
    _submit(dashboard, root_b, "run-b")
    killed = _kill_when_half_done(root_b)
    assert _wait_status(dashboard, "run-b", {"FAILED", "STOPPED", "SUCCEEDED"}, 300) == "FAILED"
    assert _wait_status(dashboard, "run-a", {"FAILED", "STOPPED", "SUCCEEDED"}, 1200) == "SUCCEEDED"

    _submit(dashboard, root_b, "run-b-again")
    assert _wait_status(dashboard, "run-b-again", {"FAILED", "STOPPED", "SUCCEEDED"}, 1200) == "SUCCEEDED"
    again = _job(dashboard, "logs", "run-b-again")
    assert "pairs: reusing the finished dataset" in again
    assert re.search(rf"expert {killed['finished'].capitalize()}\s+skipped", again), again[-3000:]
    assert re.search(rf"expert {killed['resuming'].capitalize()}\s+trained", again), again[-3000:]

    for slug in ("hate", "violence"):  # the interrupted run ends exactly where the uninterrupted one does
        a, b = _lora(root_a, slug), _lora(root_b, slug)
        assert a.keys() == b.keys()
        differing = [f"{k}: max |diff| {(a[k] - b[k]).abs().max():.2e}" for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{slug}: {len(differing)} tensors differ, e.g. {differing[0]}"
    assert _partial_files(root_a) == [] and _partial_files(root_b) == []
    assert sorted(p.name for p in (root_a / "pairs").iterdir()) == sorted(p.name for p in (root_b / "pairs").iterdir())

    client = mlflow.MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`mlflow.parentRunId` IS NULL")
    by_root = {}
    for parent in parents:
        by_root.setdefault(parent.data.params["run_root"], []).append(parent)
    assert {len(v) for v in by_root.values()} == {1, 2} and set(by_root) == {str(root_a), str(root_b)}
    resumed = max(by_root[str(root_b)], key=lambda r: r.info.start_time)
    for parent in parents:  # each parent's expert runs are its own run root's
        children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        experts = sorted(c.data.tags[tracking.STAGE_TAG] for c in children
                         if c.data.tags.get(tracking.STAGE_TAG, "").startswith("expert/"))
        if parent.data.params["run_root"] == str(root_a):
            assert experts == ["expert/hate", "expert/violence"]
        elif parent.info.run_id == resumed.info.run_id:
            assert experts == [f"expert/{killed['resuming']}"]  # the finished one was not trained again
            run_of = client.search_runs([experiment], filter_string=f"tags.`{tracking.STAGE_TAG}` = "
                                        f"'expert/{killed['resuming']}' and tags.`mlflow.parentRunId` = "
                                        f"'{parent.info.run_id}'")[0]
            assert run_of.data.metrics["resumed_from_step"] >= killed["step"]
