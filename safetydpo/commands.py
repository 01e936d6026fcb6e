"""The command lines of ``jobs/*.py``: each parses its flags, then runs stages of :mod:`safetydpo.stages`
inside :func:`safetydpo.cli.session`. ``jobs/<name>.py`` calls the ``<name>`` function here, so tests
and other tools can run a job in-process without loading scripts by path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import get_args

from mlflow.entities import Run

from safetydpo import cli, stages, storage, tracking
from safetydpo.categories import ALL, normalize_category
from safetydpo.config import PROJECT_ROOT, Config, MergeMethod
from safetydpo.data import DataError
from safetydpo.data.pairs import build_pairs
from safetydpo.evaluation import report
from safetydpo.evaluation import run as evaluation
from safetydpo.evaluation import seeds as seed_spread
from safetydpo.evaluation.benchmarks import BENCHMARKS
from safetydpo.evaluation.metrics import IP, QUALITY, REDIRECT_OVERALL
from safetydpo.experts import ExpertError
from safetydpo.merge.lora_file import MergeError
from safetydpo.model_ids import CHAMPION


def _log_info() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("safetydpo").setLevel(logging.INFO)


class _Alongside(threading.Thread):
    """A stage running beside the next ones (``Stage.alongside``): its metrics or its error, and its wall time.
    A daemon thread, so a pipeline that fails elsewhere does not wait for it."""

    def __init__(self, stage: stages.Stage, config: Config) -> None:
        super().__init__(name=f"stage-{stage.name}", daemon=True)
        self.stage, self.config = stage, config
        self.metrics: Mapping[str, float] = {}
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        start = time.perf_counter()
        try:
            self.metrics = self.stage.run(self.config)
        except BaseException as err:  # re-raised in the pipeline's thread by outcome()
            self.error = err
        self.seconds = time.perf_counter() - start
        print(f"stage {self.stage.name}: {'failed' if self.error else 'done'} in {self.seconds:.1f} s", flush=True)

    def outcome(self) -> tuple[Mapping[str, float], float]:
        """Wait for the stage; its metrics and seconds, or its error raised here."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.metrics, self.seconds


def pipeline(argv: list[str] | None = None) -> int:
    """Run the SafetyDPO pipeline, stage after stage, under one MLflow parent run."""
    p = cli.parser(pipeline.__doc__)
    names = stages.NAMES
    p.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {names}")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and every stage that reads its results: their outputs move to "
                        "<run_root>/superseded/<time>/ first (repeatable)")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    selected = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(selected + args.force) - set(names))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {names}")
    if skipped := sorted(set(args.force) - set(selected)):
        p.error(f"--force {','.join(skipped)}: not among --stages {','.join(selected)}")
    _log_info()
    for src, dst in stages.supersede(config, args.force) if args.force else ():
        print(f"--force: moved {src} -> {dst}", flush=True)
    summary: dict[str, Mapping[str, float]] = {}
    times: dict[str, float] = {}
    with cli.session(config) as run:
        alongside: dict[str, _Alongside] = {}

        def record(name: str, metrics: Mapping[str, float], seconds: float) -> None:
            summary[name], times[name] = metrics, seconds
            # The parent run's headline numbers: the same names in every pipeline run, to compare runs.
            tracking.log_metrics({f"time/{name}_s": seconds} | dict(metrics))

        for stage in stages.STAGES:
            if stage.name not in selected:
                continue
            for name in [n for n in stage.needs if n in alongside]:
                record(name, *alongside.pop(name).outcome())
            print(f"stage {stage.name}: started{' (alongside the next stages)' if stage.alongside else ''}",
                  flush=True)
            if stage.alongside:
                alongside[stage.name] = _Alongside(stage, config)
                alongside[stage.name].start()
                continue
            start = time.perf_counter()
            metrics = stage.run(config)
            record(stage.name, metrics, time.perf_counter() - start)
            print(f"stage {stage.name}: done in {times[stage.name]:.1f} s", flush=True)
        for name in list(alongside):
            record(name, *alongside.pop(name).outcome())
        version = tracking.headline_tags(config)
    _print_summary(config, run, summary, times, version)
    return 0


def _print_summary(config: Config, run: Run, summary: dict[str, Mapping[str, float]], times: dict[str, float],
                   version: str | None) -> None:
    """The job's last lines: base vs champion on each benchmark's headline metrics, stage times, where to look."""
    print("\n== safetydpo pipeline finished ==")
    results = summary.get("evaluate", {})
    for benchmark in config.eval.benchmarks:
        rows = sorted(k.removeprefix(f"{benchmark}/") for k in results
                      if k.startswith(f"{benchmark}/{IP}/") or k.startswith(f"{benchmark}/{QUALITY}/")
                      or k == f"{benchmark}/{REDIRECT_OVERALL}")
        if rows:
            print(f"{benchmark + ' (test split)':28s} {'base':>8s} {CHAMPION:>9s}")
        for name in rows:
            champion = results.get(f"{CHAMPION}/{benchmark}/{name}", float("nan"))
            print(f"  {name:26s} {results[f'{benchmark}/{name}']:8.3f} {champion:9.3f}")
    print("stage times  " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()))
    print(f"run root     {config.run_root}")
    print(f"MLflow run   {tracking.run_url(run)} (experiment {config.tracking.experiment})")
    print(f"registered   models:/{config.tracking.registered_model}@{CHAMPION} (version {version or '-'})")
    if "serve/deploy_s" in summary.get("deploy", {}):
        print(f"Serve        {config.serve.url} (model 'merged' = the champion)")


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


def seeds(argv: list[str] | None = None) -> int:
    """Run the pipeline's stages once per training seed (dpo.seed and distill.seed) and report how much each
    headline figure moves: per seed, mean, standard deviation, min and max. The config's own seed runs in its
    run root (a finished run is reused as it is), every other seed s in <run_root>/seeds/seed-<s>; the pairs,
    the validation and test prompts and the evaluation seeds are the same for all. Writes
    <run_root>/seeds/<benchmark>_spread.csv and .md."""
    p = cli.parser(seeds.__doc__)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--stages", default="generate,experts,evaluate",
                   help="the pipeline stages each seed runs (add merge-search,merge-distill for the merge; "
                        "without merge-search the baselines are the experts unless eval.baselines is given)")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if len(set(args.seeds)) < 2:
        p.error("--seeds: give at least two different seeds")
    roots = {s: config.run_root if s == config.dpo.seed else seed_spread.seed_root(config.run_root, s)
             for s in args.seeds}
    overrides = list(args.overrides)
    if "merge-search" not in args.stages and not any(o.startswith("eval.baselines=") for o in overrides):
        overrides.append("eval.baselines=[experts]")  # no merge: no champion to compare
    for seed, root in roots.items():
        command = [sys.executable, str(PROJECT_ROOT / "jobs" / "pipeline.py"), "--config", args.config,
                   "--stages", args.stages, *overrides, f"run_root={root}", f"dpo.seed={seed}",
                   f"distill.seed={seed}"]
        print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
        if code := subprocess.run(command, cwd=PROJECT_ROOT).returncode:
            print(f"error: seed {seed}'s pipeline exited with {code}", file=sys.stderr)
            return code
    for benchmark in config.eval.benchmarks:
        table = seed_spread.spread({s: seed_spread.read_evaluations(r, benchmark) for s, r in roots.items()})
        out = storage.join(config.run_root, seed_spread.SEEDS_DIR, f"{benchmark}_spread")
        storage.write_bytes(f"{out}.csv", table.to_csv().encode())
        storage.write_bytes(f"{out}.md", report.markdown(table).encode())
        print(f"\n{benchmark}: each figure across seeds {args.seeds} ({out}.md)\n{report.markdown(table)}", flush=True)
    return 0
