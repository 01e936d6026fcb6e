"""Train the safety experts: one Diffusion-DPO LoRA per category, several at once on Ray.

    python jobs/train_experts.py --config jobs/configs/toy.yaml [--categories Hate Sexual all]
                                 [--pairs DIR] [key.sub=value ...]

Reads the newest ``<run_root>/pairs/<fingerprint>/`` (or ``--pairs``), writes
``<run_root>/experts/<category>/``; finished experts are skipped. Run standalone it opens its own
MLflow parent run (or joins ``$SAFETYDPO_PARENT_RUN_ID``); inside ``jobs/pipeline.py`` it is the
``experts`` stage.
"""

from __future__ import annotations

import os
import sys

import ray

from safetydpo import cli, experts, localcluster, tracking
from safetydpo.categories import normalize_category
from safetydpo.config import Config


def run(config: Config, pairs: str | None = None, names: list[str] | None = None) -> dict[str, float]:
    """The pipeline stage: train what is missing, return headline numbers (needs Ray and an MLflow run)."""
    records = experts.train_experts(config, pairs=pairs, names=names)
    for name, record in records.items():
        print(f"expert {name:17s} {record['status']:8s} {record['lora']}", flush=True)
    return experts.describe(records)


def _names(values: list[str]) -> list[str]:
    """``--categories`` values: category names (any known spelling) or ``all``."""
    return [experts.ALL if v.strip().lower() == experts.ALL else normalize_category(v) for v in values]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--categories", nargs="+", metavar="NAME",
                   help="experts to train: categories and/or 'all' (default: the config's)")
    p.add_argument("--pairs", help="pairs folder or file (default: the newest under <run_root>/pairs)")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    try:
        names = _names(args.categories) if args.categories else None
    except ValueError as err:
        p.error(str(err))
    localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    with tracking.pipeline_run(config, run_name=f"{config.name}-experts"):
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        address = None if os.environ.get("RAY_ADDRESS") else "local"  # never a stray cluster by accident
        ray.init(address=address, runtime_env={"env_vars": tracking.worker_env()}, include_dashboard=False)
        try:
            summary = run(config, pairs=cli.resolve_local(args.pairs) if args.pairs else None, names=names)
        except experts.ExpertError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            ray.shutdown()
    print("  ".join(f"{k}={v:g}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
