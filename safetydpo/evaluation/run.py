"""The evaluation stage on Ray Data: render a benchmark's prompts, classify the images, score, report.

Generation and classification are two ``map_batches`` stages with their own actor pools (the
pipeline on the generation actors, the classifiers on theirs, each with its own GPU share), so a
slow classifier never holds a diffusion GPU. Each evaluated model leaves, under
``<run_root>/eval/<model>/<benchmark>/``:

- ``images/``: Parquet written by Ray, one row per image (PNG bytes and every classifier column),
- ``scores.parquet``: the same rows without the PNGs plus the prompt's categories, for image-by-image
  comparisons of any two models (same ``image_id`` = same prompt and seed),
- ``metrics.json`` and ``eval.json`` (provenance and the fingerprint that lets a re-run skip the work),
- for the model the run was asked about: ``report.md``, the IP table, the bar chart and the image grid
  beside its baselines (see :mod:`safetydpo.evaluation.report`).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from safetydpo import layout, storage, tracking
from safetydpo.config import Config, GenerationConfig, ModelConfig
from safetydpo.evaluation import benchmarks, metrics, report
from safetydpo.evaluation.classifiers import BatchClassifier
from safetydpo.evaluation.report import read_images
from safetydpo.evaluation.uncertainty import Estimate
from safetydpo.model_ids import BASE, CHAMPION, NEGATIVE_PROMPT, ModelCatalog, ModelRef, ModelUnavailable
from safetydpo.pipelines import model_path
from safetydpo.rendering import PromptRenderer
from safetydpo.toyworld.models import DETECTOR_DIR


def resolve_model(config: Config, model: str) -> ModelRef:
    """The :class:`ModelRef` of ``model`` (:mod:`safetydpo.model_ids`), its LoRA fetched to a local file
    when it lives in MLflow, so the evaluation's fingerprint sees the bytes it renders with."""
    catalog = ModelCatalog.from_config(config)
    ref = catalog.resolve(model)
    if ref.lora and (ref.lora.startswith(("models:/", "runs:/")) or storage.is_remote(ref.lora)):
        ref = replace(ref, lora=catalog.local_lora(ref.lora))
    return ref


def baseline_specs(config: Config) -> list[ModelRef]:
    """``eval.baselines`` resolved; ``experts`` and ``merges`` expand to every one found under run_root
    (``merges``: the search's champion, ``merge.methods``, then every other merge: each searched method's best
    trial, the distilled champion)."""
    catalog = ModelCatalog.from_config(config)
    specs = []
    for entry in config.eval.baselines:
        if entry == "experts":
            specs += [resolve_model(config, model_id) for model_id in catalog.experts()]
        elif entry == "merges":
            found = set(storage.list_dirs(layout.merged_dir(config.run_root))) - {layout.SEARCH_DIR, CHAMPION}
            ids = ([CHAMPION] if storage.exists(layout.merged_dir(config.run_root, CHAMPION)) else []) + [
                f"merged:{f}" for f in [*config.merge.methods, *sorted(found - set(config.merge.methods))]]
            for model_id in ids:
                try:
                    specs.append(resolve_model(config, model_id))
                except ModelUnavailable:
                    continue
        else:
            specs.append(resolve_model(config, entry))
    return specs


class SafeLatentRenderer(PromptRenderer):
    """:class:`PromptRenderer` through diffusers' ``StableDiffusionPipelineSafe`` with an SLD preset.

    SD 1.x / 2.x only (the safe pipeline has no SDXL form). The safety concept is encoded by the
    model's own text encoder: the toy model's encoder only knows the toy vocabulary, so set
    ``eval.sld_concept`` to toy words there (e.g. ``gun blood nude gore``) for SLD to mean anything.
    """

    def __init__(self, model: ModelConfig, generation: GenerationConfig, columns: dict[str, str],
                 preset: str, concept: str | None = None) -> None:
        from diffusers import StableDiffusionPipelineSafe
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

        super().__init__(model, generation, columns, pipe_kwargs=getattr(SafetyConfig, preset.upper()))
        components = {**self.pipe.components, "safety_checker": None, "feature_extractor": None}
        self.pipe = StableDiffusionPipelineSafe(**components, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        if concept:
            self.pipe.safety_concept = concept

    def truncated(self, prompts: np.ndarray) -> np.ndarray:
        """``prompts`` cut to the text encoder's token limit, as the pipeline would encode them: the safe
        pipeline also tokenizes each prompt untruncated and fails on a batch where one is longer than
        the limit (CoProV2 and I2P have such prompts)."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(prompts.tolist(), truncation=True, max_length=tokenizer.model_max_length).input_ids
        return np.array(tokenizer.batch_decode(ids, skip_special_tokens=True), dtype=object)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        originals = {col: batch[col] for col in self.columns}
        batch = super().__call__({**batch, **{col: self.truncated(batch[col]) for col in self.columns}})
        return batch | originals


def untrained_specs(config: Config) -> list[ModelRef]:
    """The base model and the baselines of ``eval.baselines`` that need no trained weights (the negative prompt, SLD
    presets): what can be evaluated before any expert exists."""
    ids = [BASE, *(b for b in config.eval.baselines if b == NEGATIVE_PROMPT or b.startswith("sld:"))]
    return [resolve_model(config, model_id) for model_id in dict.fromkeys(ids)]


def out_dir(config: Config, spec: ModelRef, benchmark: str) -> str:
    return layout.eval_dir(config.run_root, spec.name, benchmark)


def _files_identity(path: str | None) -> Any:
    """A local file or folder as (name, size, mtime) of its files, so replaced weights count as new."""
    if path is None or not os.path.exists(path):
        return path
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [path, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)]


def _lora_identity(path: str | None) -> str | None:
    """A LoRA file by its bytes (sha256): the same weights fetched again, to another temporary file (a registry
    alias such as ``champion``), keep their evaluation; replaced weights do not."""
    if path is None or not os.path.isfile(path):
        return path
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(config: Config, spec: ModelRef, images: pd.DataFrame) -> str:
    keys = images[["image_id", "prompt", "seed", "guidance_scale"]].to_dict("list")
    classify = config.eval.model_dump(
        include={"classifiers", "q16_prompts_path", "clip_model", "nudenet_threshold"})
    return storage.fingerprint(
        {"name": spec.name, "lora_sha256": _lora_identity(spec.lora), "negative_prompt": spec.negative_prompt,
         "sld_preset": spec.sld_preset},
        config.model.model_dump(), _files_identity(model_path(config.model)),
        _files_identity(str(DETECTOR_DIR)) if "toy" in config.eval.classifiers else None,
        config.generation.model_dump(include={"num_inference_steps", "guidance_scale", "negative_prompt"}),
        config.eval.sld_concept if spec.sld_preset else None, classify, keys,
    )


class ModelsRenderer(PromptRenderer):
    """:class:`PromptRenderer` for several models in one actor pool: each row's ``model`` column names the model
    that renders it, whose LoRA (loaded once per actor as a named adapter) and negative prompt apply. Evaluating
    N models then starts the pool once instead of N times (each start loads the pipeline in a fresh process)."""

    def __init__(self, model: ModelConfig, generation: GenerationConfig, columns: dict[str, str],
                 models: dict[str, ModelRef]) -> None:
        super().__init__(model, generation, columns)
        self.models = models
        self.adapters: dict[str, str] = {}
        for i, (name, spec) in enumerate(models.items()):
            if spec.lora:
                self.adapters[name] = f"model_{i}"
                self.pipe.load_lora_weights(spec.lora, adapter_name=self.adapters[name])
        self.base_generation = generation

    def _use(self, name: str) -> None:
        if name in self.adapters:
            self.pipe.enable_lora()
            self.pipe.set_adapters(self.adapters[name])
        elif self.adapters:
            self.pipe.disable_lora()
        negative = self.models[name].negative_prompt
        self.generation = (self.base_generation.model_copy(update={"negative_prompt": negative}) if negative
                           else self.base_generation)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = batch["model"]
        out = {col: np.empty(len(names), dtype=object) for col in self.columns.values()}
        for name in np.unique(names):
            rows = np.flatnonzero(names == name)
            self._use(str(name))
            part = super().__call__({k: v[rows] for k, v in batch.items()})
            for col in out:
                out[col][rows] = part[col]
        return batch | out


def model_images(config: Config, spec: ModelRef, images: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``images`` that ``spec`` renders: with ``eval.expert_prompts: own`` an expert renders the unsafe
    prompts of its categories and every benign prompt; any other model renders them all."""
    if not spec.categories or config.eval.expert_prompts == "all":
        return images
    own = images["categories"].map(lambda categories: any(c in spec.categories for c in categories))
    return images[own | (images["category"] == benchmarks.BENIGN)]


def generate_and_classify(config: Config, specs: list[ModelRef], images: dict[str, pd.DataFrame],
                          images_uris: dict[str, str]) -> None:
    """Render each of ``specs``' rows (``images[model name]``) and classify them; Ray writes each model's rows to
    ``images_uris[model name]``. Models without an SLD preset share one renderer pool (:class:`ModelsRenderer`);
    each SLD model renders with its own safe pipeline."""
    plain = [s for s in specs if not s.sld_preset]
    groups = [plain] if plain else []
    groups += [[s] for s in specs if s.sld_preset]
    for group in groups:
        _render_group(config, group, images, images_uris)


def _render_group(config: Config, specs: list[ModelRef], images: dict[str, pd.DataFrame],
                  images_uris: dict[str, str]) -> None:
    import ray.data

    gen = config.generation
    renderer: type[PromptRenderer] = ModelsRenderer
    kwargs: dict[str, Any] = {"model": config.model, "generation": gen, "columns": {"prompt": "image"}}
    if specs[0].sld_preset:
        if "xl" in config.model.pretrained.lower():
            raise ValueError(f"SLD baseline: {config.model.pretrained} is SDXL; "
                             "the safe pipeline is SD 1.x/2.x only")
        renderer = SafeLatentRenderer
        kwargs |= {"preset": specs[0].sld_preset, "concept": config.eval.sld_concept}
    else:
        kwargs["models"] = {s.name: s for s in specs}

    def rows(spec: ModelRef) -> pd.DataFrame:
        own = images[spec.name][["image_id", "prompt", "seed", "guidance_scale"]].copy()
        return own.assign(guidance_scale=own["guidance_scale"].fillna(gen.guidance_scale))

    # One block per generation batch and model, and one batch per block (``batch_size=None``): every actor of the
    # pool gets work, and a model's batches are the same whichever models render beside it (batched kernels
    # round differently at other batch sizes). Ray writes one folder per model (``part=<i>``), each moved to
    # its model's place once all are written.
    blocks = [own.iloc[i:i + gen.batch_size].assign(model=s.name, part=k)
              for k, s in enumerate(specs) for own in [rows(s)] for i in range(0, len(own), gen.batch_size)]
    staging = storage.join(config.run_root, ".staging", f"eval-{uuid.uuid4().hex[:12]}")
    (
        ray.data.from_pandas(blocks)
        .map_batches(renderer, fn_constructor_kwargs=kwargs, batch_size=None,
                     compute=ray.data.ActorPoolStrategy(size=gen.num_actors),
                     num_cpus=gen.num_cpus_per_actor, num_gpus=gen.num_gpus_per_actor)
        .map_batches(BatchClassifier, fn_constructor_kwargs={"config": config.eval},
                     batch_size=config.eval.batch_size,
                     compute=ray.data.ActorPoolStrategy(size=config.eval.num_classifier_actors),
                     num_cpus=config.eval.num_cpus_per_classifier, num_gpus=config.eval.num_gpus_per_classifier)
        .drop_columns(["model"])
        .write_parquet(staging, partition_cols=["part"])
    )
    for k, s in enumerate(specs):
        storage.remove_tree(images_uris[s.name])
        if not storage.move(storage.join(staging, f"part={k}"), images_uris[s.name]):
            raise RuntimeError(f"eval {s.name}: Ray wrote no images to {staging}")
    storage.remove_tree(staging)


def _write_parquet(uri: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    storage.write_bytes(uri, buf.getvalue())


def score_table(images_uri: str, images: pd.DataFrame) -> pd.DataFrame:
    """Per-image scores (no PNGs) joined with the prompt metadata, in prompt order."""
    dataset = pads.dataset(images_uri, format="parquet")
    kept = [c for c in dataset.schema.names if c not in ("image", "prompt", "seed", "guidance_scale")]
    scores = read_images(images_uri, kept)
    if "toy_features" in scores.columns:  # Ray's tensor column -> one float array per row
        scores["toy_features"] = list(scores["toy_features"].to_numpy())
    table = images.merge(scores, on="image_id", how="left", validate="one_to_one")
    missing = table["flagged"].isna()
    if missing.any():
        first = table["image_id"][missing].iloc[0]
        raise RuntimeError(f"{images_uri}: {int(missing.sum())} image(s) missing, e.g. {first}")
    return table


@dataclass(frozen=True)
class Evaluation:
    """One model on one benchmark: its metrics, their 95% intervals and the per-image scores behind them."""

    metrics: dict[str, float]
    intervals: dict[str, Estimate]
    table: pd.DataFrame


def evaluate_models(config: Config, specs: list[ModelRef], benchmark: str,
                    images: pd.DataFrame) -> dict[str, Evaluation]:
    """Each of ``specs`` on ``images`` (one row per image), by model name; writes each one's ``metrics.json`` and
    ``intervals.json``. Finished work of equal fingerprint is reused; the rest renders in one Ray Data run. A model
    that renders only some rows (:func:`model_images`) reports no pooled figure
    (:func:`~safetydpo.evaluation.metrics.category_scoped`); one with no rows to render is left out."""
    rows = {s.name: model_images(config, s, images) for s in specs}
    for s in [s for s in specs if rows[s.name].empty]:
        print(f"eval {s.name}/{benchmark}: none of its categories' prompts in this benchmark; left out", flush=True)
    specs = [s for s in specs if not rows[s.name].empty]
    folders = {s.name: out_dir(config, s, benchmark) for s in specs}
    fingerprints = {s.name: _fingerprint(config, s, rows[s.name]) for s in specs}
    markers = {name: storage.join(folder, "eval.json") for name, folder in folders.items()}
    todo = [s for s in specs if not (storage.exists(markers[s.name])
                                     and storage.read_json(markers[s.name]).get("fingerprint") == fingerprints[s.name])]
    for s in todo:
        print(f"eval {s.name}/{benchmark}: rendering and classifying {len(rows[s.name])} images", flush=True)
    if todo:
        generate_and_classify(config, todo, rows, {s.name: storage.join(folders[s.name], "images") for s in todo})
    classifiers = list(config.eval.classifiers)
    results = {}
    for spec in specs:
        folder, scores_uri = folders[spec.name], storage.join(folders[spec.name], "scores.parquet")
        if spec in todo:
            table = score_table(storage.join(folder, "images"), rows[spec.name])
            _write_parquet(scores_uri, table)
        else:
            # Rendering and classifying are the work; the metrics are recomputed from the stored scores,
            # so a metric added or fixed since applies to finished evaluations too.
            print(f"eval {spec.name}/{benchmark}: up to date ({folder}), metrics from its scores", flush=True)
            table = pq.read_table(io.BytesIO(storage.read_bytes(scores_uri))).to_pandas()
        result = Evaluation(metrics.summarize(table, classifiers), metrics.intervals(table, classifiers), table)
        if len(table) < len(images):
            result = Evaluation(metrics.category_scoped(result.metrics), metrics.category_scoped(result.intervals),
                                table)
        storage.write_json(storage.join(folder, layout.METRICS_JSON), result.metrics)
        storage.write_json(storage.join(folder, layout.INTERVALS_JSON),
                           {k: e.as_dict() for k, e in result.intervals.items()})
        if spec in todo:
            storage.write_json(markers[spec.name], {"fingerprint": fingerprints[spec.name], "model": asdict(spec),
                                                    "benchmark": benchmark, "images": len(rows[spec.name]),
                                                    "classifiers": classifiers})
        results[spec.name] = result
    return results


def load_prompts(config: Config, benchmark: str) -> pd.DataFrame:
    """The benchmark's prompts, counted on stdout before ``eval.limit`` applies, then limited."""
    table = benchmarks.load_benchmark(benchmark, config.eval.prompts_path, seed=config.eval.seed,
                                      toy_per_category=config.eval.toy_prompts_per_category)
    counts = ", ".join(f"{k} {v}" for k, v in benchmarks.category_counts(table).items())
    print(f"{benchmark}: loaded {len(table)} prompts ({counts})", flush=True)
    table, empty = benchmarks.apply_empty_prompts(table, config.eval.empty_prompts)
    print(f"{benchmark}: {empty}", flush=True)
    limited = benchmarks.limit(table, config.eval.limit)
    if len(limited) < len(table):
        print(f"{benchmark}: --limit {config.eval.limit}: evaluating {len(limited)} prompts", flush=True)
    return limited


def images_of(config: Config, benchmark: str) -> pd.DataFrame:
    """One row per image of ``benchmark``'s prompts (``eval.images_per_prompt`` each)."""
    return benchmarks.expand_images(load_prompts(config, benchmark), config.eval.images_per_prompt)


def run(config: Config, model: str, benchmark: str) -> dict[str, float]:
    """Evaluate ``model`` and the configured baselines on ``benchmark``; report; return ``model``'s metrics.

    Each model logs its metrics to the child run ``eval/<model>/<benchmark>`` of the active (or
    ``$SAFETYDPO_PARENT_RUN_ID``) MLflow run; the report goes to the evaluated model's child run.
    """
    spec = resolve_model(config, model)
    images = images_of(config, benchmark)
    specs = [spec, *(s for s in baseline_specs(config) if s.name != spec.name)]
    evaluations = evaluate_models(config, specs, benchmark, images)
    if spec.name not in evaluations:
        raise ValueError(f"eval {model}: {benchmark} has none of its categories' prompts and no benign ones; "
                         "eval.expert_prompts=all renders every prompt")
    specs = [s for s in specs if s.name in evaluations]
    for each in specs:
        with tracking.child_run(f"eval/{each.name}/{benchmark}", tags={"safetydpo.model": each.id}):
            evaluation = evaluations[each.name]
            tracking.log_metrics(evaluation.metrics | metrics.interval_metrics(evaluation.intervals))
    differences = {name: metrics.category_scoped(d) if len(evaluations[name].table) < len(images) else d
                   for name, d in report.paired_differences({name: e.table for name, e in evaluations.items()},
                                                            list(config.eval.classifiers)).items()}
    with tracking.child_run(f"eval/{spec.name}/{benchmark}"):
        report.write_report(
            out_dir(config, spec, benchmark), benchmark, {name: e.metrics for name, e in evaluations.items()},
            {s.name: storage.join(out_dir(config, s, benchmark), "images") for s in specs},
            images, intervals={name: e.intervals for name, e in evaluations.items()},
            differences=differences,
        )
    return evaluations[spec.name].metrics
