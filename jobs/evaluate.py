"""Evaluate a model and its baselines on one benchmark: IP per category, quality, a report.

    python jobs/evaluate.py --config jobs/configs/toy.yaml --model base --benchmark toy
    python jobs/evaluate.py --config C --model merged|merged:<method>|expert:<category>|sld:<preset>|
        negative_prompt|<LoRA path>|runs:/<run id>/<path>|models:/<name>@<alias>
        --benchmark coprov2|i2p|ud|coco|toy [--prompts PATH] [--limit N] [key.sub=value ...]

Prints how many prompts it read, in total and per category (before ``--limit``), then renders and
classifies on Ray Data, and writes ``<run_root>/eval/<model>/<benchmark>/`` (images Parquet, per-image
scores, metrics.json, report.md, plots), logged to MLflow under the pipeline's parent run.
"""

from __future__ import annotations

import os
import sys

import ray

from safetydpo import cli, localcluster, tracking
from safetydpo.evaluation.benchmarks import BENCHMARKS
from safetydpo.evaluation.run import run


def _init_ray() -> bool:
    """Join ``$RAY_ADDRESS`` (or the local cluster) or start Ray in-process; False if already up."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    runtime_env = {"env_vars": tracking.worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
    return True


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="base", help="what to evaluate (see the module docstring)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--prompts", help="prompt CSV (I2P and Unsafe Diffusion need one); sets eval.prompts_path")
    p.add_argument("--limit", type=int, help="at most N prompts, spread over categories; sets eval.limit")
    args = p.parse_args(argv)
    if args.limit is not None:
        args.overrides.append(f"eval.limit={args.limit}")
    config = cli.load(p, args)
    if args.prompts:  # a command-line path is relative to the current directory
        config.eval.prompts_path = os.path.abspath(args.prompts)
    localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    with tracking.pipeline_run(config) as parent:
        started = _init_ray()
        try:
            metrics = run(config, args.model, args.benchmark)
        finally:
            if started:
                ray.shutdown()
    print(f"MLflow: {tracking.run_url(parent)}")
    print("  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
