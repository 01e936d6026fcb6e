"""The pipeline's stages, in order: each reads the config, writes under the run root, opens its own
MLflow child runs and returns headline metrics for the summary.

A stage needs Ray (joined or started by :func:`safetydpo.cli.session`) and an active MLflow run (or
``$SAFETYDPO_PARENT_RUN_ID``). ``jobs/pipeline.py`` runs :data:`STAGES`; ``jobs/<stage>.py`` runs one.
Every stage skips the work whose outputs exist for the same inputs; :func:`supersede` moves a stage's
outputs (and its dependants') aside so that it runs again. Plug new stages into :data:`STAGES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from safetydpo import experts, layout, smoke, storage, tracking
from safetydpo.config import Config
from safetydpo.evaluation import run as evaluation
from safetydpo.evaluation.metrics import benchmark_metric
from safetydpo.generation import MANIFEST, generate_pairs, log_generation, pairs_location, summary_line
from safetydpo.merge.stage import DISTILLED, distill_stage, merge_stage, search_stage
from safetydpo.model_ids import CHAMPION

SUPERSEDED_DIR = "superseded"  # <run_root>/superseded/<UTC time>/: outputs moved aside by --force


def generate(config: Config) -> dict[str, float]:
    """Render (or reuse) the preference pairs in the child run ``generate``."""
    with tracking.child_run("generate"):
        reused = storage.exists(storage.join(pairs_location(config), MANIFEST))
        path = generate_pairs(config)
        metrics = log_generation(path)
    if not reused:  # generate_pairs logs the reuse itself
        print(summary_line(path), flush=True)
    return metrics


def train_experts(config: Config, pairs: str | None = None, names: list[str] | None = None) -> dict[str, float]:
    """Train the experts not yet finished (``names``: a subset; ``pairs``: another pairs dataset)."""
    records = experts.train_experts(config, pairs=pairs, names=names)
    for name, record in records.items():
        print(f"expert {name:17s} {record['status']:8s} {record['lora']}", flush=True)
    return experts.describe(records)


def evaluate_untrained(config: Config) -> dict[str, float]:
    """Render and score the baselines that need no trained weights (base, negative prompt, SLD) on every
    benchmark, in one generation actor's share of the cluster (its classifier reserves no CPU): the pipeline runs
    this beside the experts stage, whose rounds leave a slot idle (the last of 7 experts on 2 slots trains alone);
    ``evaluate`` then finds them up to date."""
    one_actor = config.model_copy(update={
        "generation": config.generation.model_copy(update={"num_actors": 1}),
        "eval": config.eval.model_copy(update={"num_cpus_per_classifier": 0.0})})
    for benchmark in config.eval.benchmarks:
        evaluation.evaluate_models(one_actor, evaluation.untrained_specs(config), benchmark,
                                   evaluation.images_of(config, benchmark))
    return {}


def evaluate(config: Config) -> dict[str, float]:
    """The base model beside its baselines (``eval.baselines``: every trained expert, the champion and the
    other merges...) on every configured benchmark. Returns the base's and the champion's metrics as
    ``<benchmark>/<family>/<name>`` and ``champion/<benchmark>/<family>/<name>``."""
    out: dict[str, float] = {}
    for benchmark in config.eval.benchmarks:
        out |= {benchmark_metric(benchmark, k): v for k, v in evaluation.run(config, "base", benchmark).items()}
        champion = storage.join(layout.eval_dir(config.run_root, CHAMPION, benchmark), layout.METRICS_JSON)
        if storage.exists(champion):
            out |= {f"{CHAMPION}/{benchmark_metric(benchmark, k)}": v for k, v in storage.read_json(champion).items()}
    return out


def deploy(config: Config) -> dict[str, float]:
    """Deploy the champion on Ray Serve (``serve/deploy.py``) when this job runs on a Ray cluster, which keeps
    the application up after the job ends; skipped when Ray runs inside this process and would stop with it."""
    if not os.environ.get("RAY_ADDRESS"):
        print("deploy: skipped, Ray runs in this process and would stop with it; submit the pipeline to a cluster "
              "(`ray job submit`, `make cluster-up`) or run jobs/deploy.py against one", flush=True)
        return {}
    from serve.deploy import deploy as deploy_app  # serve/ builds on this package, not the other way round

    return deploy_app(config)


def _pairs(config: Config) -> list[str]:
    return [pairs_location(config)]


def _search(config: Config) -> list[str]:
    merged = layout.merged_dir(config.run_root)
    best = [m for m in storage.list_dirs(merged) if m.startswith("best_")]
    return [layout.merged_dir(config.run_root, m) for m in [layout.SEARCH_DIR, CHAMPION, *best]]


def _untrained_evaluations(config: Config) -> list[str]:
    return [layout.eval_dir(config.run_root, s.name, b)
            for s in evaluation.untrained_specs(config) for b in config.eval.benchmarks]


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: its function, the folders holding its results (moved aside by ``--force``)
    and the stages whose results it reads. An ``alongside`` stage runs in a thread beside the stages after it,
    until one that needs it: Ray shares the cluster between them."""

    name: str
    run: Callable[[Config], Mapping[str, float]]
    outputs: Callable[[Config], list[str]] = lambda _: []
    needs: tuple[str, ...] = ()
    alongside: bool = False


STAGES: list[Stage] = [
    Stage("ray-smoke", smoke.run),
    Stage("generate", generate, _pairs),
    Stage("evaluate-untrained", evaluate_untrained, _untrained_evaluations, alongside=True),
    Stage("experts", train_experts, lambda c: [layout.experts_dir(c.run_root)], needs=("generate",)),
    Stage("merge", merge_stage, lambda c: [layout.merged_dir(c.run_root, m) for m in c.merge.methods],
          needs=("experts",)),
    Stage("merge-search", search_stage, _search, needs=("experts",)),
    Stage("merge-distill", distill_stage, lambda c: [layout.merged_dir(c.run_root, DISTILLED)],
          needs=("merge-search",)),
    Stage("evaluate", evaluate, lambda c: [storage.join(c.run_root, layout.EVAL_DIR)],
          needs=("evaluate-untrained", "experts", "merge", "merge-search", "merge-distill")),
    Stage("deploy", deploy, needs=("merge-search", "merge-distill")),
]
NAMES = [stage.name for stage in STAGES]


def dependants(names: list[str]) -> list[str]:
    """``names`` and every stage that reads their results, directly or not, in pipeline order."""
    found = set(names)
    for stage in STAGES:  # in order, so a dependant's dependants are found in the same pass
        if found.intersection(stage.needs):
            found.add(stage.name)
    return [n for n in NAMES if n in found]


def supersede(config: Config, names: list[str]) -> list[tuple[str, str]]:
    """Move the outputs of ``names`` and their dependants to ``<run_root>/superseded/<UTC time>/`` (nothing is
    deleted), so that those stages redo their work; returns (moved from, moved to) pairs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = config.run_root.rstrip("/")
    redone = dependants(names)
    moved = []
    for stage in STAGES:
        if stage.name in redone:
            for path in stage.outputs(config):
                target = storage.join(root, SUPERSEDED_DIR, stamp, path[len(root):].lstrip("/"))
                if storage.move(path, target):
                    moved.append((path, target))
    return moved
