"""Render the preference pairs: both prompts of every pair, by the model being aligned (``pairs/``).

    python jobs/generate.py --config jobs/configs/toy.yaml [--skip-bad-rows] [key.sub=value ...]

Writes ``<run_root>/pairs/<fingerprint>/``: a finished dataset is reused, an interrupted one is
resumed. Logs the child run ``generate`` under the pipeline's MLflow parent run (a new parent when
run alone, or ``$SAFETYDPO_PARENT_RUN_ID``'s). ``run(config)`` is the stage ``jobs/pipeline.py`` calls.
"""

from __future__ import annotations

import logging
import os
import sys

import ray

from safetydpo import cli, localcluster, tracking
from safetydpo.config import Config
from safetydpo.data import DataError
from safetydpo.data.pairs import build_pairs
from safetydpo.generation import generate_pairs, log_generation, summary_line


def run(config: Config) -> dict[str, float]:
    """The stage: render (or reuse) the pairs in the child run ``generate``; returns its metrics."""
    with tracking.child_run("generate"):
        path = generate_pairs(config)
        metrics = log_generation(path)
    print(summary_line(path), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed CoProV2 rows (and their twins) and log a count instead of failing")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if args.skip_bad_rows:
        config.data.skip_bad_rows = True
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("safetydpo").setLevel(logging.INFO)
    try:
        build_pairs(config.data)  # bad data fails here, before an MLflow run or a Ray cluster starts
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    with tracking.pipeline_run(config, run_name=f"{config.name}-generate"):
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False,
                 runtime_env={"env_vars": tracking.worker_env()})
        try:
            run(config)
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
