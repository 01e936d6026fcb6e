"""The experts stage's driver: one ``TorchTrainer`` per expert, several side by side as Ray Tune trials.

Experts run as trials of one Ray Tune run, at most :func:`concurrency` at once: the trial function
is the trainer's driver, which is how Ray Train V2 runs several trainers side by side. A trial
reserves memory but no CPU (it only waits on its trainer); each trainer's workers reserve
``experts.cpus_per_worker`` each. Ray Data reads the pairs with tasks of one whole CPU, so one CPU
always stays free for the reads.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.train
import ray.train.torch
from ray import tune

from safetydpo import layout, storage, tracking
from safetydpo.config import Config
from safetydpo.experts.data import benign_dataset, pairs_dataset, scan_pairs
from safetydpo.experts.entry import BENIGN, TRAIN, train_loop
from safetydpo.experts.spec import (
    ExpertError,
    ExpertSpec,
    expert_categories,
    expert_dir,
    expert_fingerprint,
    expert_names,
    is_finished,
)

logger = logging.getLogger(__name__)

TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}  # the trial's Python process; Tune refuses all-zero


def ray_dir(run_root: str) -> str:
    """``experts/_ray``: the trainers' checkpoints and the Tune run that drives them."""
    return storage.join(layout.experts_dir(run_root), layout.RAY_DIR)


def worker_resources(config: Config) -> dict[str, float]:
    """What one training worker reserves: its CPUs, a GPU with ``use_gpu``, and ``worker_resources``."""
    experts = config.experts
    return {"CPU": experts.cpus_per_worker} | ({"GPU": 1.0} if experts.use_gpu else {}) | experts.worker_resources


def concurrency(config: Config, experts_to_train: int) -> int:
    """How many experts train at once: ``experts.max_concurrent``, bounded by what the cluster holds now.

    Each expert reserves ``num_workers`` x :func:`worker_resources`. No CPU is held back for Ray Data:
    an expert's rows are read (materialised) before its trainer reserves anything, and the trainer then
    replays them from the object store without tasks (:func:`~safetydpo.experts.data.pairs_dataset`).
    """
    available = ray.cluster_resources()
    need = worker_resources(config)
    fits = min(available.get(k, 0.0) // (v * config.experts.num_workers) for k, v in need.items() if v > 0)
    if fits < 1:
        logger.warning("experts: the cluster has %s, one expert needs %d x %s; waiting for an autoscaler",
                       available, config.experts.num_workers, need)
    return int(max(1, min(config.experts.max_concurrent, experts_to_train, fits)))


def _publish(config: Config, spec: ExpertSpec, pairs: str, fp: str, result: ray.train.Result) -> dict[str, Any]:
    """Copy the final checkpoint's LoRA into ``experts/<slug>/`` and write ``expert.json`` last."""
    metrics = dict(result.metrics or {})
    folder = expert_dir(config.run_root, spec.name)
    lora = layout.lora_file(folder)
    with result.checkpoint.as_directory() as ckpt:
        storage.write_bytes(lora, Path(layout.lora_file(ckpt)).read_bytes())
    meta = {
        "name": spec.name, "categories": list(spec.categories), "fingerprint": fp,
        "data_hash": spec.data_hash, "num_pairs": spec.num_pairs, "pairs": pairs,
        "steps": metrics["step"], "final_metrics": {k: v for k, v in metrics.items() if k != "step"},
        "checkpoint": result.checkpoint.path, "lora": lora,
        "config": {"model": config.model.model_dump(mode="json"),
                   "dpo": config.experts.dpo_for(config.dpo, spec.name).model_dump(mode="json"),
                   "experts": config.experts.model_dump(mode="json")},
    }
    storage.write_json(storage.join(folder, layout.EXPERT_JSON), meta)
    with tracking.child_run(f"expert/{spec.slug}"):
        mlflow.log_dict(meta, layout.EXPERT_JSON)
    return meta


def fit_expert(config: Config, spec: ExpertSpec, pairs: str, env: dict[str, str],
               benign: ray.data.Dataset | None = None) -> dict[str, Any]:
    """Train one expert with a ``TorchTrainer`` and publish its LoRA and ``expert.json``.

    ``benign`` is :func:`~safetydpo.experts.data.benign_dataset`, read once for all experts; read
    here when the expert's ``preserve_weight`` needs it and none is given. Returns the expert's
    record: ``status`` is ``trained`` or ``failed`` (non-finite loss, with the error).
    """
    start = time.perf_counter()
    dpo = config.experts.dpo_for(config.dpo, spec.name)
    datasets = {TRAIN: pairs_dataset(pairs, spec, dpo.seed)}
    if dpo.preserve_weight:
        datasets[BENIGN] = benign if benign is not None else benign_dataset(pairs, dpo.seed)
    fp = expert_fingerprint(config, spec)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "spec": spec, "env": env, "fingerprint": fp},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.experts.num_workers, use_gpu=config.experts.use_gpu,
            resources_per_worker=worker_resources(config)),
        run_config=ray.train.RunConfig(
            name=f"{spec.slug}-{fp}", storage_path=ray_dir(config.run_root),
            failure_config=ray.train.FailureConfig(max_failures=config.experts.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    record = {"name": spec.name, "fingerprint": fp, "checkpoint": result.checkpoint.path,
              "seconds": time.perf_counter() - start}
    if metrics.get("error"):
        return record | {"status": "failed", "error": metrics["error"], "steps": metrics["step"]}
    meta = _publish(config, spec, pairs, fp, result)
    return record | {"status": "trained", "lora": meta["lora"], "steps": meta["steps"]}


def _trial(params: dict[str, str], *, config: Config, specs: dict[str, ExpertSpec], pairs: str,
           env: dict[str, str], benign: ray.data.Dataset | None) -> dict[str, Any]:
    """Ray Tune trial: drive one expert's trainer."""
    os.environ.update(env)
    return fit_expert(config, specs[params["expert"]], pairs, env, benign)


def train_experts(config: Config, pairs: str | None = None,
                  names: list[str] | None = None) -> dict[str, dict]:
    """Train every configured expert not yet finished, :func:`concurrency` of them at a time.

    ``names`` narrows the experts (categories and/or ``all``); ``pairs`` defaults to the dataset
    the generation stage renders for ``config``. Needs an active MLflow run or
    ``$SAFETYDPO_PARENT_RUN_ID`` (the experts log as its child runs). Returns a record per expert;
    raises :class:`ExpertError` after the other experts finished when any failed.
    """
    names = names or expert_names(config)
    if pairs is None:
        from safetydpo.generation import pairs_location  # the model stack; Tune's trial processes import this module

        pairs = pairs_location(config)
    specs = scan_pairs(pairs, names, config.experts.num_workers, tuple(expert_categories(config)))
    records = {s.name: {"name": s.name, "status": "skipped",
                        "lora": layout.lora_file(expert_dir(config.run_root, s.name))}
               for s in specs.values() if is_finished(config, s)}
    todo = {name: spec for name, spec in specs.items() if name not in records}
    logger.info("experts: %d finished already %s", len(records), sorted(records))
    if todo:
        at_once = concurrency(config, len(todo))
        logger.info("experts: training %s, %d at once", sorted(todo), at_once)
        env = tracking.worker_env()
        # The preservation term's benign images are the same for every expert: one copy in the object store.
        preserving = any(config.experts.dpo_for(config.dpo, name).preserve_weight for name in todo)
        benign = benign_dataset(pairs, config.dpo.seed) if preserving else None
        trial = tune.with_parameters(_trial, config=config, specs=todo, pairs=pairs, env=env, benign=benign)
        tuner = tune.Tuner(
            tune.with_resources(trial, TRIAL_RESOURCES),
            param_space={"expert": tune.grid_search(list(todo))},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=ray_dir(config.run_root),
                failure_config=tune.FailureConfig(max_failures=config.experts.max_failures), verbose=0,
            ),
        )
        for result in tuner.fit():
            name = result.config["expert"]
            if result.error is not None:
                records[name] = {"name": name, "status": "failed", "error": str(result.error)}
            else:
                records[name] = {k: result.metrics[k] for k in ("name", "status", "fingerprint", "checkpoint",
                                                                 "seconds", "steps", "lora", "error")
                                 if k in result.metrics}
    failed = [r for r in records.values() if r["status"] == "failed"]
    if failed:
        raise ExpertError("expert(s) failed, the others finished:\n  " +
                          "\n  ".join(f"{r['name']}: {r['error']}" for r in failed))
    return records


def describe(records: dict[str, dict]) -> dict[str, float]:
    """Headline numbers of :func:`train_experts`' records for the pipeline summary."""
    count = {s: sum(r["status"] == s for r in records.values()) for s in ("trained", "skipped")}
    return {"experts/trained": count["trained"], "experts/skipped": count["skipped"]}
