"""The pipeline's stages, in order: each reads the config, writes under the run root, opens its own
MLflow child runs and returns headline metrics for the summary.

A stage needs Ray (joined or started by :func:`safetydpo.cli.session`) and an active MLflow run (or
``$SAFETYDPO_PARENT_RUN_ID``). ``jobs/pipeline.py`` runs :data:`STAGES`; ``jobs/<stage>.py`` runs one.
Plug new stages into :data:`STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from safetydpo import experts, layout, smoke, storage, tracking
from safetydpo.config import Config
from safetydpo.evaluation import run as evaluation
from safetydpo.evaluation.metrics import benchmark_metric
from safetydpo.generation import generate_pairs, log_generation, summary_line
from safetydpo.merge.stage import distill_stage, merge_stage, search_stage
from safetydpo.model_ids import CHAMPION

Stage = Callable[[Config], Mapping[str, float]]


def generate(config: Config) -> dict[str, float]:
    """Render (or reuse) the preference pairs in the child run ``generate``."""
    with tracking.child_run("generate"):
        path = generate_pairs(config)
        metrics = log_generation(path)
    print(summary_line(path), flush=True)
    return metrics


def train_experts(config: Config, pairs: str | None = None, names: list[str] | None = None) -> dict[str, float]:
    """Train the experts not yet finished (``names``: a subset; ``pairs``: another pairs dataset)."""
    records = experts.train_experts(config, pairs=pairs, names=names)
    for name, record in records.items():
        print(f"expert {name:17s} {record['status']:8s} {record['lora']}", flush=True)
    return experts.describe(records)


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


STAGES: list[tuple[str, Stage]] = [
    ("ray-smoke", smoke.run),
    ("generate", generate),
    ("experts", train_experts),
    ("merge", merge_stage),
    ("merge-search", search_stage),
    ("merge-distill", distill_stage),
    ("evaluate", evaluate),
]
