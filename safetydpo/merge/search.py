"""The merge search: Ray Tune trials of merge settings, judged on the validation split; the champion.

Each trial (a function trainable with its own CPU/GPU share) merges the experts with one point of the
space (:func:`search_space`), writes the LoRA under ``merged/search/<trial>/``, renders the validation
split's unsafe prompts of every category and their safe twins in-process, and reports the evaluation
stage's metrics. Two objectives: overall IP (min) and quality (``tune.quality_metric``, max); Optuna's
multi-objective TPE samples them (``tune.search: optuna``) or the space is sampled at random. Ray has no Pareto API:
:func:`pareto_front` computes it from the results table. The champion is the lowest-IP trial whose
quality stays within ``tune.quality_tolerance`` of the base model's on the same prompts; it is copied
to ``merged/champion/`` and registered in MLflow with alias ``champion``. The test split is never seen.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import mlflow
import pandas as pd
from ray import tune

from safetydpo import layout, storage, tracking
from safetydpo.config import Config
from safetydpo.evaluation import inline
from safetydpo.evaluation.metrics import IP_OVERALL
from safetydpo.experts.spec import expert_slug
from safetydpo.merge.build import MergeSettings, build_merge, finished_experts

logger = logging.getLogger(__name__)

IP, QUALITY = "objective_ip", "objective_quality"  # what trials report for the searcher (flat names)
CHAMPION = "champion"  # merged/champion/ and the registry alias
_WEIGHT = "w_"  # search-space key prefix of an expert's weight


def search_space(config: Config, experts: list[str]) -> dict[str, Any]:
    """Tune's ``param_space`` from ``config.tune``: method, scale, density, Co-Merge options, expert weights."""
    t = config.tune
    space: dict[str, Any] = {
        "method": tune.choice(list(t.methods)),
        "scale": tune.loguniform(*t.scale),
        "density": tune.uniform(*t.density),
        "preserve": tune.loguniform(*t.preserve),
        "granularity": tune.choice(list(t.granularities)),
        "input_source": tune.choice(list(t.input_sources)),
    }
    if t.expert_weight is not None:
        space |= {_WEIGHT + expert_slug(name): tune.uniform(*t.expert_weight) for name in experts}
    return space


def settings_of(params: dict[str, Any], experts: list[str], config: Config) -> MergeSettings:
    """A trial's parameters as :class:`MergeSettings` (fields the method ignores are dropped by ``relevant``)."""
    keys = {name: _WEIGHT + expert_slug(name) for name in experts}
    weights = {name: float(params[key]) for name, key in keys.items() if key in params}
    return MergeSettings(params["method"], float(params["scale"]), float(params["density"]), params["granularity"],
                         params["input_source"], float(params["preserve"]), weights, config.merge.rank,
                         config.merge.seed).relevant()


def _trial(params: dict[str, Any], *, config: Config, experts: list[str], table: pd.DataFrame,
           stage_run_id: str, env: dict[str, str]) -> None:
    """One point: merge, render the validation prompts, report IP and quality; an MLflow child run."""
    os.environ.update(env | {tracking.PARENT_ENV: stage_run_id})
    trial_id = tune.get_context().get_trial_id()
    settings = settings_of(params, experts, config)
    folder = storage.join(layout.merged_dir(config.run_root, layout.SEARCH_DIR), trial_id)
    record = build_merge(config, settings, folder)
    start = time.perf_counter()
    metrics = inline.score(config, table, record["lora"])
    score_seconds = time.perf_counter() - start
    with tracking.child_run(f"merge-search/{trial_id}", tags={"safetydpo.trial": trial_id}):
        tracking.log_params({"method": settings.method, "scale": settings.scale, "density": settings.density,
                             "preserve": settings.preserve,
                             "granularity": settings.granularity, "input_source": settings.input_source,
                             **{f"weight.{k}": v for k, v in settings.weights.items()}})
        tracking.log_metrics(metrics | {"merge_seconds": record["seconds"], "score_seconds": score_seconds,
                                        "svd_error_max": record["svd_error_max"]})
    print(f"merge-search trial {trial_id}: {settings.method} scale {settings.scale:.2f}, validation IP "
          f"{metrics[IP_OVERALL]:.3f}, {config.tune.quality_metric} {metrics[config.tune.quality_metric]:.3f} "
          f"({record['seconds'] + score_seconds:.0f} s)", flush=True)
    tune.report(metrics | {IP: metrics[IP_OVERALL], QUALITY: metrics[config.tune.quality_metric],
                           "merge_seconds": record["seconds"], "score_seconds": score_seconds,
                           "folder": folder})


def pareto_front(frame: pd.DataFrame) -> pd.Series:
    """True for the trials no other trial beats on both objectives (lower IP, higher quality)."""
    ip, quality = frame[IP].to_numpy(), frame[QUALITY].to_numpy()
    return pd.Series([not any((ip <= ip[i]) & (quality >= quality[i]) & ((ip < ip[i]) | (quality > quality[i])))
                      for i in range(len(frame))], index=frame.index)


def choose_champion(frame: pd.DataFrame, base_quality: float, tolerance: float) -> pd.Series | None:
    """The lowest-IP trial whose quality drop from the base stays within ``tolerance`` (ties: higher quality)."""
    eligible = frame[frame[QUALITY] >= base_quality - tolerance]
    if eligible.empty:
        return None
    return eligible.sort_values([IP, QUALITY], ascending=[True, False]).iloc[0]


def run_search(config: Config, stage_run_id: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """Run the trials; their results table (one row per finished trial) and the base model's metrics on the
    same validation prompts."""
    experts = list(finished_experts(config))
    table = inline.validation_prompts(config)
    base = inline.score(config, table, None)
    mlflow.log_metrics({f"base/{k}": v for k, v in base.items()})
    t = config.tune
    searcher = None
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # Multi-objective TPE; Optuna 5's NSGA-II sampler holds a thread lock, and the Tuner pickles its searcher.
        searcher = OptunaSearch(metric=[IP, QUALITY], mode=["min", "max"],
                                sampler=optuna.samplers.TPESampler(seed=t.seed))
    trial = tune.with_parameters(_trial, config=config, experts=experts, table=table, stage_run_id=stage_run_id,
                                 env=tracking.worker_env())
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial}),
        param_space=search_space(config, experts),
        # reuse_actors: a trial's process (torch, diffusers imported) serves the next trial; a fresh one costs
        # about as much as the trial's own merge and render on the toy world.
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=f"search-{time.strftime('%Y%m%d-%H%M%S')}", verbose=0,
                                  storage_path=storage.join(layout.merged_dir(config.run_root, layout.SEARCH_DIR),
                                                            layout.RAY_DIR)),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        logger.warning("merge search: %d of %d trials failed, first: %s", len(failed), len(results), failed[0].error)
    frame = results.get_dataframe()
    frame = frame[frame[IP].notna()] if IP in frame else frame
    if frame.empty:
        raise RuntimeError(f"merge search: no trial finished ({len(failed)} failed)")
    return frame.reset_index(drop=True), base

