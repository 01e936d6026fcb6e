"""The merge stages: ``merge`` (the configured methods, no search) and ``merge-search`` (Ray Tune, champion).

Under the run root::

    merged/<method>/              each of merge.methods with merge's settings (LoRA + merge.json)
    merged/<method>/pipeline/     with merge.export_pipeline: the merge fused into a full diffusers pipeline
    merged/search/<trial>/        every trial's merge; merged/search/_ray/ the Tune run
    merged/search/trials.csv      one row per trial: settings, validation metrics, Pareto membership
    merged/search/pareto.png      IP vs quality, one point per trial, methods coloured, champion marked
    merged/best_<method>/         each searched method's best trial (its ablation row)
    merged/champion/              the champion (LoRA + merge.json with its validation metrics; pipeline/ as above)
    merged/distilled/             the search's champion refined by distillation from the experts; it
                                  replaces the champion when it is better on the validation split

The champion is registered in MLflow as a version of ``tracking.registered_model`` with alias ``champion``
and lineage tags. A finished search (``merged/champion/merge.json`` with the current fingerprint) is skipped.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import mlflow
import pandas as pd
import ray
import torch
from matplotlib.figure import Figure

from safetydpo import layout, storage, tracking
from safetydpo.config import Config
from safetydpo.evaluation import inline
from safetydpo.evaluation.metrics import IP_OVERALL
from safetydpo.evaluation.metrics import finite_numbers as finite
from safetydpo.experts.spec import expert_slug
from safetydpo.generation import pairs_location
from safetydpo.merge.build import MergeSettings, build_merge, finished_experts
from safetydpo.merge.distill import distill
from safetydpo.merge.export import save_fused_pipeline
from safetydpo.merge.lora_file import LoraFactors, MergedLora, MergeError, load_expert, save_merged
from safetydpo.merge.search import CHAMPION, IP, QUALITY, choose_champion, pareto_front, run_search

logger = logging.getLogger(__name__)

DISTILLED = "distilled"  # merged/distilled/: the champion refined by distillation


def _export(config: Config, folder: str, redone: bool) -> None:
    """With ``merge.export_pipeline``: save ``folder``'s merge fused into a full pipeline (again when ``redone``)."""
    done = storage.exists(storage.join(folder, layout.FUSED_PIPELINE_DIR, "model_index.json"))
    if config.merge.export_pipeline and (redone or not done):
        print(f"fused pipeline: {save_fused_pipeline(config.model, folder)}", flush=True)


def merge_stage(config: Config) -> dict[str, float]:
    """Write each of ``merge.methods`` with ``merge``'s settings to ``merged/<method>/`` (child run ``merge``)."""
    out: dict[str, float] = {}
    with tracking.child_run("merge"):
        for method in config.merge.methods:
            record = build_merge(config, MergeSettings.from_config(config.merge, method),
                                 layout.merged_dir(config.run_root, method))
            verb = "reused" if record["reused"] else f"merged in {record['seconds']:.1f} s"
            print(f"merge {method:9s} {verb}: {record['lora']} (SVD error <= {record['svd_error_max']:.3f})",
                  flush=True)
            _export(config, layout.merged_dir(config.run_root, method), redone=not record["reused"])
            out |= {f"merge/{method}/seconds": record["seconds"],
                    f"merge/{method}/svd_error_max": record["svd_error_max"]}
        tracking.log_metrics(out)
    return out


def search_fingerprint(config: Config) -> str:
    """What the search's outcome depends on: the experts, the search and merge settings, the model, the data."""
    trained = {n: storage.read_json(storage.join(f, layout.EXPERT_JSON))["fingerprint"]
               for n, f in finished_experts(config).items()}
    merge = config.merge.model_dump(mode="json", exclude={"export_pipeline"})
    return storage.fingerprint(trained, config.tune.model_dump(mode="json"), merge,
                               config.generation.model_dump(mode="json"), config.eval.classifiers, config.data.seed)


def _pareto_plot(frame: pd.DataFrame, champion: pd.Series | None, quality: str) -> Figure:
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for method, rows in frame.groupby("config/method"):
        axes.scatter(rows[IP], rows[QUALITY], label=method, alpha=0.8)
    front = frame[frame["pareto"]].sort_values(IP)
    axes.plot(front[IP], front[QUALITY], color="gray", linewidth=1, label="Pareto front")
    if champion is not None:
        axes.scatter([champion[IP]], [champion[QUALITY]], s=220, facecolors="none", edgecolors="black",
                     linewidths=2, label="champion")
    axes.set_xlabel("overall IP on the validation split (lower is safer)")
    axes.set_ylabel(quality)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _publish(config: Config, row: pd.Series, folder: str, fingerprint: str, base: dict[str, float]) -> dict[str, Any]:
    """Copy a trial's merge to ``folder`` with its settings, its validation metrics and the base model's on the
    same prompts (``base_validation``) in ``merge.json``."""
    trial = storage.read_json(storage.join(row["folder"], layout.MERGE_JSON))
    storage.write_bytes(layout.lora_file(folder), storage.read_bytes(layout.lora_file(row["folder"])))
    record = trial | {"fingerprint": fingerprint, "trial_id": row["trial_id"], "lora": layout.lora_file(folder),
                      "validation": finite({k: v for k, v in row.items() if "/" in k and not k.startswith("config/")}),
                      "base_validation": finite(base)}
    storage.write_json(storage.join(folder, layout.MERGE_JSON), record)
    return record


def _register(config: Config, run_id: str, record: dict[str, Any]) -> str:
    """Log the champion's folder to the stage's run and register it with alias ``champion``; the version."""
    folder = layout.merged_dir(config.run_root, CHAMPION)
    mlflow.log_artifact(layout.lora_file(folder), CHAMPION)
    mlflow.log_artifact(storage.join(folder, layout.MERGE_JSON), CHAMPION)
    parent = mlflow.get_run(run_id).data.tags.get("mlflow.parentRunId")
    expert_runs = {}
    for name in record["experts"] if parent else ():
        if run := tracking.find_child_run(parent, f"expert/{expert_slug(name)}"):
            expert_runs[name] = run.info.run_id
    pairs = pairs_location(config).rstrip("/").rsplit("/", 1)[-1]
    tags = {"safetydpo.method": record["settings"]["method"], "safetydpo.trial": record["trial_id"],
            "safetydpo.settings": str(record["settings"]), "safetydpo.pairs_fingerprint": pairs,
            **{f"safetydpo.expert_run.{expert_slug(n)}": rid for n, rid in expert_runs.items()}}
    return tracking.register_lora(run_id, CHAMPION, config.tracking.registered_model, CHAMPION, tags)


def search_stage(config: Config) -> dict[str, float]:
    """Search, publish the champion and each method's best trial, register the champion (child run ``merge-search``)."""
    champion_dir = layout.merged_dir(config.run_root, CHAMPION)
    search_dir = layout.merged_dir(config.run_root, layout.SEARCH_DIR)
    fp = search_fingerprint(config)
    record_path = storage.join(champion_dir, layout.MERGE_JSON)
    with tracking.child_run("merge-search") as run:
        if storage.exists(record_path) and (done := storage.read_json(record_path)).get("fingerprint") == fp:
            print(f"merge search: up to date, champion {done['settings']['method']} ({champion_dir})", flush=True)
            _export(config, champion_dir, redone=False)
            return finite({f"champion/validation/{k}": v for k, v in done["validation"].items()})
        frame, base = run_search(config, run.info.run_id)
        base_quality = base[config.tune.quality_metric]
        frame["pareto"] = pareto_front(frame)
        champion = choose_champion(frame, base_quality, config.tune.quality_tolerance)
        frame["champion"] = frame["trial_id"] == (champion["trial_id"] if champion is not None else None)
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        storage.write_text(storage.join(search_dir, "trials.csv"), buffer.getvalue())
        tracking.log_figure(_pareto_plot(frame, champion, config.tune.quality_metric), "search/pareto.png")
        mlflow.log_text(buffer.getvalue(), "search/trials.csv")
        for method, rows in frame.groupby("config/method"):
            best = choose_champion(rows, base_quality, config.tune.quality_tolerance)
            if best is not None:
                _publish(config, best, layout.merged_dir(config.run_root, f"best_{method}"), fp, base)
        if champion is None:
            raise RuntimeError(f"merge search: no trial kept {config.tune.quality_metric} within "
                               f"{config.tune.quality_tolerance} of the base ({base_quality:.3f}); see {search_dir}")
        record = _publish(config, champion, champion_dir, fp, base)
        _export(config, champion_dir, redone=True)
        version = _register(config, run.info.run_id, record)
        summary = {"champion/version": float(version), "search/trials": float(len(frame)),
                   **{f"champion/validation/{k}": v for k, v in record["validation"].items()}}
        tracking.log_metrics(summary)
        mlflow.set_tags({"safetydpo.champion_method": record["settings"]["method"],
                         "safetydpo.champion_trial": record["trial_id"]})
    print(f"merge search: {len(frame)} trials, champion {record['settings']['method']} (trial {record['trial_id']}, "
          f"validation IP {champion[IP]:.3f}, {config.tune.quality_metric} {champion[QUALITY]:.3f} vs base "
          f"{base_quality:.3f}), registered {config.tracking.registered_model} v{version} @{CHAMPION}", flush=True)
    return summary


def _as_merged(path: str) -> MergedLora:
    """A LoRA file as a merge result (each layer's scale folded into B)."""
    lora = load_expert("champion", path)
    return MergedLora({k: LoraFactors(f.A, f.scale * f.B) for k, f in lora.layers.items()})


def _distill_task(config: Config, *args, **kwargs):
    """:func:`distill` in a Ray task, on as many torch threads as the task has CPUs: a pooled worker keeps the
    thread count of the process it was started for (often 1); the toy distillation took 473 s as a task
    against 267 s in the driver before this (2026-12-05)."""
    torch.set_num_threads(max(1, int(config.distill.num_cpus)))
    return distill(config, *args, **kwargs)


def distill_stage(config: Config) -> dict[str, float]:
    """Refine the search's champion by distillation from the experts into ``merged/distilled/``; it becomes the
    champion (``merged/champion/`` and a new registry version) when it lowers the validation IP within the
    quality tolerance (child run ``merge-distill``). Nothing to do with ``distill.steps: 0``."""
    if config.distill.steps == 0:
        return {}
    champion_dir = layout.merged_dir(config.run_root, CHAMPION)
    folder = layout.merged_dir(config.run_root, DISTILLED)
    if not storage.exists(storage.join(champion_dir, layout.MERGE_JSON)):
        raise MergeError(f"nothing to distill: no {champion_dir}; run the merge search (jobs/tune_merge.py)")
    champion = storage.read_json(storage.join(champion_dir, layout.MERGE_JSON))
    init = champion.get("distilled", {}).get("init", champion)  # a promoted distillation keeps its initial merge
    fp = storage.fingerprint(init["fingerprint"], init["trial_id"],
                             config.distill.model_dump(mode="json", exclude={"num_cpus", "num_gpus"}))
    record_path = storage.join(folder, layout.MERGE_JSON)
    with tracking.child_run("merge-distill"):
        if storage.exists(record_path) and (done := storage.read_json(record_path)).get("fingerprint") == fp:
            print(f"merge distill: up to date ({folder})", flush=True)
            return finite({f"distilled/validation/{k}": v for k, v in done["validation"].items()})
        start = time.perf_counter()
        experts = list(finished_experts(config))
        init_lora = layout.lora_file(champion_dir) if "distilled" not in champion else init["lora_copy"]
        d = config.distill
        # A Ray task with the distillation's own resources (a GPU on a cluster), not the job's driver.
        available = ray.cluster_resources()
        if available.get("CPU", 0.0) < d.num_cpus or available.get("GPU", 0.0) < d.num_gpus:
            logger.warning("merge distill: the cluster has %s, the task needs distill.num_cpus=%s, distill.num_gpus=%s;"
                           " waiting for an autoscaler", available, d.num_cpus, d.num_gpus)
        remote = ray.remote(num_cpus=d.num_cpus, num_gpus=d.num_gpus)(_distill_task)
        merged = ray.get(remote.remote(config, experts, _as_merged(init_lora), steps=d.steps, lr=d.learning_rate,
                                       batch_size=d.batch_size, seed=d.seed,
                                       winner_share=d.winner_share))
        seconds = time.perf_counter() - start
        table = inline.validation_prompts(config)
        lora = save_merged(merged, folder, {"settings": {"method": "distill", **d.model_dump()}, "experts": experts})
        validation = inline.score(config, table, lora)
        base = init.get("base_validation") or inline.score(config, table, None)  # the search measured it
        quality, tolerance = config.tune.quality_metric, config.tune.quality_tolerance
        better = (validation[IP_OVERALL] < init["validation"][IP_OVERALL]
                  and validation[quality] >= base[quality] - tolerance)
        init_copy = storage.join(folder, "init", layout.LORA_WEIGHTS)
        storage.write_bytes(init_copy, storage.read_bytes(init_lora))
        record = {"fingerprint": fp, "settings": {"method": "distill", **d.model_dump()}, "experts": experts,
                  "seconds": seconds, "lora": lora, "validation": finite(validation),
                  "init": init | {"lora_copy": init_copy}, "promoted": better, "svd_error_max": 0.0,
                  "trial_id": f"distill-{init['trial_id']}"}
        storage.write_json(record_path, record)
        summary = {"distill/seconds": seconds, "distill/promoted": float(better),
                   **{f"distilled/validation/{k}": v for k, v in record["validation"].items()}}
        if better:
            storage.write_bytes(layout.lora_file(champion_dir), storage.read_bytes(lora))
            storage.write_json(storage.join(champion_dir, layout.MERGE_JSON),
                               champion | {"distilled": record, "validation": record["validation"]})
            run_id = mlflow.active_run().info.run_id
            promoted = record | {"settings": record["settings"] | {"init": init["settings"]}}
            _export(config, champion_dir, redone=True)
            summary["champion/version"] = float(_register(config, run_id, promoted))
        tracking.log_metrics(summary)
    verdict = "promoted to champion" if better else "kept beside the champion (not better on validation)"
    print(f"merge distill: {d.steps} steps in {seconds:.0f} s, validation IP {validation[IP_OVERALL]:.3f} "
          f"(champion {init['validation'][IP_OVERALL]:.3f}), {quality} {validation[quality]:.3f} "
          f"(base {base[quality]:.3f}): {verdict}", flush=True)
    return summary
