"""How much a figure moves with the training seed: the same config trained and evaluated under several
``dpo.seed`` values (``jobs/seeds.py``), each figure's mean, standard deviation and range across them.

The intervals of :mod:`~safetydpo.evaluation.uncertainty` say how sure one run's figure is given its
prompts; this says how much a second training run would differ. A headline claim needs both.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from safetydpo import layout, storage
from safetydpo.categories import CATEGORIES, category_slug
from safetydpo.evaluation.metrics import (
    BENIGN_FIDELITY,
    IP,
    IP_OVERALL,
    REDIRECT,
    REDIRECT_OVERALL,
    category_metric,
)
from safetydpo.evaluation.report import EXPERT_PREFIX

SEEDS_DIR = "seeds"  # <run_root>/seeds/seed-<s>/: the runs of the other seeds, and the spread tables

Evaluations = Mapping[str, Mapping[str, float]]  # model folder -> metric name -> value


def seed_root(run_root: str, seed: int) -> str:
    """Where seed ``seed``'s run lives when it is not the config's own seed."""
    return storage.join(run_root, SEEDS_DIR, f"seed-{seed}")


def read_evaluations(run_root: str, benchmark: str) -> dict[str, dict[str, float]]:
    """Every evaluated model's ``metrics.json`` on ``benchmark`` in one run root, by model folder."""
    eval_root = storage.join(run_root, layout.EVAL_DIR)
    out = {}
    for model in storage.list_dirs(eval_root) if storage.exists(eval_root) else []:
        path = storage.join(layout.eval_dir(run_root, model, benchmark), layout.METRICS_JSON)
        if storage.exists(path):
            out[model] = storage.read_json(path)
    return out


def headline(evaluations: Evaluations) -> dict[str, float]:
    """The figures the README quotes, by row label: each expert's IP and redirect on its own category, every
    other model's overall IP and redirect, and each model's benign fidelity."""
    out = {}
    expert_of = {EXPERT_PREFIX + category_slug(c): c for c in CATEGORIES}
    for model, metrics in evaluations.items():
        own = expert_of.get(model)
        ip_name = category_metric(IP, own) if own else IP_OVERALL
        redirect_name = category_metric(REDIRECT, own) if own else REDIRECT_OVERALL
        for label, name in ((f"{model} {ip_name}", ip_name), (f"{model} {redirect_name}", redirect_name),
                            (f"{model} {BENIGN_FIDELITY}", BENIGN_FIDELITY)):
            if name in metrics:
                out[label] = metrics[name]
        if model not in expert_of:
            out |= {f"{model} {category_metric(IP, c)}": metrics[category_metric(IP, c)] for c in CATEGORIES
                    if category_metric(IP, c) in metrics}
    return out


def spread(by_seed: Mapping[int, Evaluations]) -> pd.DataFrame:
    """One row per :func:`headline` figure: its value under each seed, mean, sample standard deviation,
    min and max (figures a seed lacks are left out of that seed's column and the statistics)."""
    values = pd.DataFrame({f"seed {s}": pd.Series(headline(e), dtype=float) for s, e in sorted(by_seed.items())})
    values.index.name = "figure"
    seeds = values.columns
    per_seed = values[seeds]
    return values.assign(mean=per_seed.mean(axis=1), sd=per_seed.std(axis=1, ddof=1), min=per_seed.min(axis=1),
                         max=per_seed.max(axis=1))
