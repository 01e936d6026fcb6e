"""Run the SafetyDPO pipeline, stage after stage, under one MLflow parent run.

    python jobs/pipeline.py --config jobs/configs/toy.yaml [--stages a,b] [key.sub=value ...]

Joins a Ray cluster when one is configured (``$RAY_ADDRESS``, set by ``ray job submit``) or when
``cluster/local.py up`` runs one here; otherwise starts Ray in-process. Workers get the MLflow
store and the parent run id through their environment (``tracking.worker_env``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping

import generate  # sibling entrypoints: jobs/ is on sys.path when this file runs as a script
import ray
import train_experts

from safetydpo import cli, localcluster, smoke, tracking
from safetydpo.config import Config
from safetydpo.evaluation import run as evaluation

Stage = Callable[[Config], Mapping[str, float]]

# The pipeline, in order: (name, stage). A stage reads the config, writes under run_root, opens its
# own child runs, and returns headline metrics for the summary. Plug new stages in here.
STAGES: list[tuple[str, Stage]] = [
    ("ray-smoke", smoke.run),
    ("generate", generate.run),
    ("experts", train_experts.run),
    ("evaluate", evaluation.base_and_baselines_stage),
]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    names = [name for name, _ in STAGES]
    p.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {names}")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    selected = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(selected) - set(names))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {names}")

    joined = localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    summary: dict[str, Mapping[str, float]] = {}
    with tracking.pipeline_run(config) as run:
        print(f"MLflow run {run.info.run_id} at {tracking.resolve_tracking_uri(config)}", flush=True)
        started = cli.init_ray()
        where = os.environ.get("RAY_ADDRESS") or "in-process"
        print(f"Ray: {where}" + (f" (local cluster: {', '.join(joined)})" if joined else ""), flush=True)
        try:
            for name, stage in STAGES:
                if name in selected:
                    start = time.perf_counter()
                    summary[name] = stage(config)
                    print(f"stage {name}: done in {time.perf_counter() - start:.1f} s", flush=True)
        finally:
            if started:
                ray.shutdown()

    print("\n== safetydpo pipeline finished ==")
    print(f"run root    {config.run_root}")
    print(f"MLflow run  {run.info.run_id} (experiment {config.tracking.experiment})")
    print(f"MLflow UI   {tracking.run_url(run)}")
    for name, metrics in summary.items():
        print(f"{name:11s} " + "  ".join(f"{k}={v:g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
