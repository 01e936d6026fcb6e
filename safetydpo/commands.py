"""The command lines of ``jobs/*.py``: each parses its flags, then runs stages of :mod:`safetydpo.stages`
inside :func:`safetydpo.cli.session`. ``jobs/<name>.py`` calls the ``<name>`` function here, so tests
and other tools can run a job in-process without loading scripts by path.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import get_args

from safetydpo import cli, stages, tracking
from safetydpo.categories import ALL, normalize_category
from safetydpo.config import MergeMethod
from safetydpo.data import DataError
from safetydpo.data.pairs import build_pairs
from safetydpo.evaluation import run as evaluation
from safetydpo.evaluation.benchmarks import BENCHMARKS
from safetydpo.experts import ExpertError
from safetydpo.merge.lora_file import MergeError


def _log_info() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("safetydpo").setLevel(logging.INFO)


def pipeline(argv: list[str] | None = None) -> int:
    """Run the SafetyDPO pipeline, stage after stage, under one MLflow parent run."""
    p = cli.parser(pipeline.__doc__)
    names = [name for name, _ in stages.STAGES]
    p.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {names}")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    selected = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(selected) - set(names))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {names}")
    summary: dict[str, Mapping[str, float]] = {}
    with cli.session(config) as run:
        for name, stage in stages.STAGES:
            if name in selected:
                start = time.perf_counter()
                summary[name] = stage(config)
                seconds = time.perf_counter() - start
                # The parent run's headline numbers: the same names in every pipeline run, to compare runs.
                tracking.log_metrics({f"time/{name}_s": seconds} | dict(summary[name]))
                print(f"stage {name}: done in {seconds:.1f} s", flush=True)
        version = tracking.headline_tags(config)
    print("\n== safetydpo pipeline finished ==")
    print(f"run root    {config.run_root}")
    print(f"MLflow run  {run.info.run_id} (experiment {config.tracking.experiment})")
    print(f"MLflow UI   {tracking.run_url(run)}")
    print(f"registered  {config.tracking.registered_model} v{version or '-'} @champion")
    for name, metrics in summary.items():
        print(f"{name:11s} " + "  ".join(f"{k}={v:g}" for k, v in metrics.items()))
    return 0


def generate(argv: list[str] | None = None) -> int:
    """Render the preference pairs: both prompts of every pair, by the model being aligned."""
    p = cli.parser(generate.__doc__)
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed CoProV2 rows (and their twins) and log a count instead of failing")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if args.skip_bad_rows:
        config.data.skip_bad_rows = True
    _log_info()
    try:
        build_pairs(config.data)  # bad data fails here, before an MLflow run or a Ray cluster starts
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with cli.session(config, run_name=f"{config.name}-generate"):
        stages.generate(config)
    return 0


def _expert_names(values: list[str]) -> list[str]:
    """``--categories`` values: category names (any known spelling) or ``all``."""
    return [ALL if v.strip().lower() == ALL else normalize_category(v) for v in values]


def train_experts(argv: list[str] | None = None) -> int:
    """Train the safety experts: one Diffusion-DPO LoRA per category, several at once on Ray."""
    p = cli.parser(train_experts.__doc__)
    p.add_argument("--categories", nargs="+", metavar="NAME",
                   help="experts to train: categories and/or 'all' (default: the config's)")
    p.add_argument("--pairs", help="pairs folder or file (default: the newest under <run_root>/pairs)")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    try:
        names = _expert_names(args.categories) if args.categories else None
    except ValueError as err:
        p.error(str(err))
    with cli.session(config, run_name=f"{config.name}-experts"):
        try:
            summary = stages.train_experts(config, pairs=cli.resolve_local(args.pairs) if args.pairs else None,
                                           names=names)
        except ExpertError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print("  ".join(f"{k}={v:g}" for k, v in summary.items()))
    return 0


def evaluate(argv: list[str] | None = None) -> int:
    """Evaluate a model and its baselines on one benchmark: IP per category, quality, a report."""
    p = cli.parser(evaluate.__doc__)
    p.add_argument("--model", default="base", help="what to evaluate: an id of safetydpo.model_ids")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--prompts", help="prompt CSV (I2P and Unsafe Diffusion need one); sets eval.prompts_path")
    p.add_argument("--limit", type=int, help="at most N prompts, spread over categories; sets eval.limit")
    args = p.parse_args(argv)
    if args.limit is not None:
        args.overrides.append(f"eval.limit={args.limit}")
    config = cli.load(p, args)
    if args.prompts:  # a command-line path is relative to the current directory
        config.eval.prompts_path = os.path.abspath(args.prompts)
    with cli.session(config) as parent:
        metrics = evaluation.run(config, args.model, args.benchmark)
    print(f"MLflow: {tracking.run_url(parent)}")
    print("  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def merge(argv: list[str] | None = None) -> int:
    """Merge the finished experts with one method (no search) into merged/<method>/."""
    p = cli.parser(merge.__doc__)
    p.add_argument("--method", choices=list(get_args(MergeMethod)),
                   help="the merge method (default: each of merge.methods)")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if args.method:
        config.merge.methods = [args.method]
    with cli.session(config, run_name=f"{config.name}-merge"):
        try:
            stages.merge_stage(config)
        except MergeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


def tune_merge(argv: list[str] | None = None) -> int:
    """Search the merge's settings with Ray Tune on the validation split, refine the champion by distillation
    (distill.steps), register the champion."""
    p = cli.parser(tune_merge.__doc__)
    p.add_argument("--num-samples", type=int, help="trials (sets tune.num_samples)")
    args = p.parse_args(argv)
    if args.num_samples is not None:
        args.overrides.append(f"tune.num_samples={args.num_samples}")
    config = cli.load(p, args)
    with cli.session(config, run_name=f"{config.name}-merge-search") as parent:
        try:
            summary = stages.search_stage(config) | stages.distill_stage(config)
        except MergeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(f"MLflow: {tracking.run_url(parent)}")
    print("  ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    return 0
