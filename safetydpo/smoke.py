"""The Ray smoke stage: proves the cluster runs tasks and Ray Data, and that workers reach MLflow.

A remote task (so the logging happens on a worker, as every real stage's will) runs a small
Ray Data pipeline, reads the cluster's resources and logs both to the child run ``ray-smoke``.
"""

from __future__ import annotations

import socket
import time

import ray

from safetydpo import tracking
from safetydpo.config import Config

ROWS = 10_000


def _double(batch: dict) -> dict:
    batch["id"] = batch["id"] * 2
    return batch


@ray.remote(num_cpus=0)  # leaves every CPU to the Ray Data tasks it launches
def _smoke(rows: int) -> dict[str, float]:
    with tracking.child_run("ray-smoke", tags={"ray.worker_host": socket.gethostname()}):
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        dataset = ray.data.range(rows).map_batches(_double, batch_format="numpy")
        total = sum(int(batch["id"].sum()) for batch in dataset.iter_batches(batch_format="numpy"))
        seconds = time.perf_counter() - start
        if total != rows * (rows - 1):
            raise RuntimeError(f"Ray Data summed {total}, expected {rows * (rows - 1)}")
        resources = ray.cluster_resources()
        metrics = {
            "cluster/nodes": sum(1 for node in ray.nodes() if node["Alive"]),
            "cluster/cpus": resources.get("CPU", 0.0),
            "cluster/gpus": resources.get("GPU", 0.0),
            "cluster/memory_gib": resources.get("memory", 0.0) / 2**30,
            "cluster/object_store_gib": resources.get("object_store_memory", 0.0) / 2**30,
            "data/rows": rows,
            "data/seconds": seconds,
        }
        tracking.log_metrics(metrics)
        return metrics


def run(config: Config) -> dict[str, float]:
    """Run the smoke task on the connected cluster; returns the metrics it logged."""
    return ray.get(_smoke.remote(ROWS))
