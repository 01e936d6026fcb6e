"""Fault tolerance of expert training on a multi-node local Ray cluster.

Two experts train side by side on a ``ray.cluster_utils.Cluster`` (a head and a worker node, 2 CPUs
in all; the trainers run on the worker node). Once the Hate expert has a checkpoint,

- its training worker process is killed: Ray Train must restart it from that checkpoint and finish all
  the configured steps, while the Violence expert runs on undisturbed;
- or the whole worker node dies (a new one joins): both experts restart on the new node from their last
  checkpoints and finish;

and MLflow must keep one run per expert. The cluster runs in a fresh process, so it never meets the
session's in-process Ray.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest

from safetydpo import experts, layout, storage, tracking
from safetydpo.config import build_config
from safetydpo.generation import generate_pairs

MAX_STEPS = 24  # the Hate worker is killed at its first registered checkpoint: enough steps remain
CHECKPOINT_EVERY = 4


def _config(root: Path):
    return build_config({
        "run_root": str(root),
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "faults"},
        "data": {"categories": ["Hate", "Violence"], "toy_pairs_per_category": 4, "val_fraction": 0.2},
        "generation": {"num_inference_steps": 2, "num_cpus_per_actor": 0.5},
        "dpo": {"max_steps": MAX_STEPS, "batch_size": 2},
        "experts": {"categories": ["Hate", "Violence"], "cpus_per_worker": 0.5, "max_concurrent": 2,
                    "worker_resources": {"trainer_slot": 1}, "checkpoint_every": CHECKPOINT_EVERY,
                    "max_failures": 2},
    })


def _registered_step(root: Path) -> int | None:
    """The step of Hate's latest checkpoint that Ray Train's controller has registered (the one a
    restarted worker resumes from), read from the controller's checkpoint-manager snapshot."""
    for snapshot in (root / "experts" / "_ray").glob("hate-*/checkpoint_manager_snapshot.json"):
        latest = json.loads(snapshot.read_text() or "{}").get("latest_checkpoint_result")
        if latest:
            return int(latest["metrics"]["step"])
    return None


def _wait_for_hate_checkpoint(root: Path, timeout_s: float = 900) -> int | None:
    """The step of Hate's first checkpoint that Ray Train's controller has registered, once there is one.

    A checkpoint directory on disk is not enough: the controller registers it only when it next polls
    the worker (every 2 s), and a worker killed before that restarts from scratch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            step = _registered_step(root)
        except (json.JSONDecodeError, OSError):  # the snapshot is being rewritten
            step = None
        if step is not None:
            return step
        time.sleep(0.2)
    return None


def _kill_hate_worker_after_checkpoint(root: Path, killed: dict) -> None:
    """SIGKILL Hate's rank-0 training worker as soon as a checkpoint of it is registered."""
    step = _wait_for_hate_checkpoint(root)
    if step is not None:
        client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
        runs = client.search_runs(
            [client.get_experiment_by_name("faults").experiment_id],
            filter_string=f"tags.`{tracking.STAGE_TAG}` = 'expert/hate'")
        pid = int(runs[0].data.tags["safetydpo.pid"])
        os.kill(pid, signal.SIGKILL)
        killed.update(pid=pid, registered_step=step)


def _scenario(root: str, fault: str) -> None:
    """Runs in a fresh process: the cluster, the pairs, the training and the fault ("worker" or "node")."""
    import ray
    from ray.cluster_utils import Cluster

    # The head reads pairs and drives the trials; training workers need a trainer slot: the worker node's.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1, resources={"trainer_slot": 2})
    ray.init(address=cluster.address)
    config = _config(Path(root))
    pairs = generate_pairs(config)
    killed: dict = {}
    if fault == "worker":
        killer = threading.Thread(target=_kill_hate_worker_after_checkpoint, args=(Path(root), killed), daemon=True)
        try:
            killer.start()
            with tracking.pipeline_run(config):
                experts.train_experts(config, pairs=pairs)
            killer.join(timeout=1)
        finally:
            ray.shutdown()
            cluster.shutdown()
    else:
        # Nodes start and stop from the main thread only (signal handlers): training runs beside it.
        errors: list[BaseException] = []

        def train() -> None:
            try:
                with tracking.pipeline_run(config):
                    experts.train_experts(config, pairs=pairs)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)

        trainer = threading.Thread(target=train, daemon=True)
        try:
            trainer.start()
            step = _wait_for_hate_checkpoint(Path(root))
            if step is not None:  # a fresh node joins and the training node dies at once, no graceful drain
                cluster.add_node(num_cpus=1, resources={"trainer_slot": 2})
                cluster.remove_node(node, allow_graceful=False)
                killed.update(node=node.node_id, registered_step=step)
            trainer.join(timeout=1500)
            if errors:
                raise errors[0]
        finally:
            ray.shutdown()
            cluster.shutdown()
    storage.write_json(str(Path(root) / "killed.json"), killed)


def _run_scenario(root: Path, fault: str) -> dict:
    process = multiprocessing.get_context("spawn").Process(target=_scenario, args=(str(root), fault))
    process.start()
    process.join(timeout=1700)
    if process.is_alive():
        process.kill()
        pytest.fail("the fault scenario did not finish in time")
    assert process.exitcode == 0
    killed = storage.read_json(str(root / "killed.json"))
    assert killed, "nothing was killed: no checkpoint of Hate was registered"
    assert killed["registered_step"] < MAX_STEPS, "Hate had finished before the kill: give it more steps"
    return killed


def _expert_runs(config) -> dict:
    """Both experts finished all their steps; MLflow holds exactly one run per expert: name -> run."""
    for name in ("Hate", "Violence"):
        meta = storage.read_json(storage.join(experts.expert_dir(config.run_root, name), layout.EXPERT_JSON))
        assert meta["steps"] == MAX_STEPS, name
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                              filter_string=f"tags.`{tracking.STAGE_TAG}` LIKE 'expert/%'")
    by_name = {r.data.tags[tracking.STAGE_TAG]: r for r in runs}
    assert len(runs) == 2 and set(by_name) == {"expert/hate", "expert/violence"}  # no duplicate runs
    return by_name


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three trainer start-ups: minutes on a quiet 2-core box, far more on a busy one
def test_killed_worker_resumes_from_checkpoint(tmp_path):
    killed = _run_scenario(tmp_path, "worker")
    config = _config(tmp_path)
    by_name = _expert_runs(config)
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    hate, violence = by_name["expert/hate"], by_name["expert/violence"]
    resumed = hate.data.metrics["resumed_from_step"]
    assert resumed >= killed["registered_step"] and resumed % CHECKPOINT_EVERY == 0
    assert int(hate.data.tags["safetydpo.pid"]) != killed["pid"]  # a new worker process finished it
    hate_steps = {m.step for m in client.get_metric_history(hate.info.run_id, "loss")}
    assert hate_steps == set(range(1, MAX_STEPS + 1))
    assert "resumed_from_step" not in violence.data.metrics  # the other expert was not restarted
    violence_steps = [m.step for m in client.get_metric_history(violence.info.run_id, "loss")]
    assert sorted(violence_steps) == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_experts_survive_the_death_of_their_worker_node(tmp_path):
    killed = _run_scenario(tmp_path, "node")
    config = _config(tmp_path)
    by_name = _expert_runs(config)
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    hate = by_name["expert/hate"]
    assert hate.data.metrics["resumed_from_step"] >= killed["registered_step"]  # not from scratch
    for run in by_name.values():  # every step was trained and logged, whichever node ran it
        assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, MAX_STEPS + 1))
