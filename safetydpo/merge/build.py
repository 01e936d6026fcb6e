"""One merge of the run root's experts: settings in, ``merged/<name>/`` out.

:class:`MergeSettings` is one point of the search space (or one configured method);
:func:`build_merge` loads the finished experts, measures the calibration inputs when Co-Merge needs
them, merges, and writes the LoRA (diffusers format) and ``merge.json`` (settings, experts, per-layer
SVD errors, time). A folder whose ``merge.json`` carries the same fingerprint is reused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from safetydpo import layout, storage
from safetydpo.categories import ALL
from safetydpo.config import Config, MergeConfig, MergeMethod
from safetydpo.data.pairs import read_pairs_pandas
from safetydpo.experts import expert_dir, expert_names
from safetydpo.experts.spec import expert_slug
from safetydpo.generation import pairs_location
from safetydpo.merge.calibration import calibration_batch, input_statistics
from safetydpo.merge.lora_file import ExpertLora, MergedLora, MergeError, load_expert, save_merged
from safetydpo.merge.methods import merge
from safetydpo.merge.regmean import regmean
from safetydpo.pipelines import load_pipeline, model_fingerprint

logger = logging.getLogger(__name__)

# The configured names of the methods of safetydpo.merge.methods: average and sum are both linear.
_METHOD = {"comerge": "co_merge", "average": "linear", "sum": "linear", "ties": "ties",
           "dare_linear": "dare_linear", "dare_ties": "dare_ties"}


@dataclass(frozen=True)
class MergeSettings:
    """Everything one merge depends on besides the experts."""

    method: MergeMethod
    scale: float = 1.0
    density: float = 0.5
    granularity: str = "weight"
    input_source: str = "base"
    preserve: float = 1.0
    weights: dict[str, float] = field(default_factory=dict)  # per expert name; missing ones weigh 1
    rank: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, merge_config: MergeConfig, method: MergeMethod) -> MergeSettings:
        return cls(method, merge_config.scale, merge_config.density, merge_config.granularity,
                   merge_config.input_source, merge_config.preserve, dict(merge_config.weights), merge_config.rank,
                   merge_config.seed)

    def relevant(self) -> MergeSettings:
        """These settings with the fields the method ignores set to their defaults (one fingerprint per merge)."""
        keep = replace(MergeSettings(self.method), scale=self.scale, weights=self.weights, seed=self.seed)
        if self.method in ("ties", "dare_linear", "dare_ties"):
            keep = replace(keep, density=self.density, rank=self.rank)
        if self.method == "regmean":
            keep = replace(keep, preserve=self.preserve, rank=self.rank)
        if self.method == "comerge":
            keep = replace(keep, granularity=self.granularity, input_source=self.input_source,
                           rank=self.rank if self.granularity == "weight" else None)
        return keep


def finished_experts(config: Config) -> dict[str, str]:
    """Name -> LoRA folder of every configured expert that has finished, in the config's order
    (the ``all`` expert, a baseline, is never merged)."""
    names = [n for n in expert_names(config) if n != ALL]
    folders = {n: expert_dir(config.run_root, n) for n in names}
    return {n: f for n, f in folders.items() if storage.exists(storage.join(f, layout.EXPERT_JSON))}


def load_experts(config: Config) -> dict[str, ExpertLora]:
    """The finished experts' factors; :class:`MergeError` when fewer than two finished."""
    folders = finished_experts(config)
    if len(folders) < 2:
        raise MergeError(f"merging needs at least two finished experts under {layout.experts_dir(config.run_root)}; "
                         f"found {sorted(folders)}: run the experts stage (jobs/train_experts.py)")
    base = model_fingerprint(config.model)
    return {name: load_expert(name, folder, base) for name, folder in folders.items()}


def calibration_rows(config: Config) -> pd.DataFrame:
    """``merge.calibration_prompts_per_category`` validation pairs per category: category, prompts and images."""
    columns = ["category", "split", "unsafe_prompt", "unsafe_image", "safe_prompt", "safe_image"]
    frame = read_pairs_pandas(pairs_location(config), columns=columns, filters=[("split", "=", "validation")])
    chosen = frame.groupby("category", sort=False).head(config.merge.calibration_prompts_per_category)
    if chosen.empty:
        raise MergeError(f"merge calibration: no validation pairs in {pairs_location(config)}")
    return chosen.reset_index(drop=True)


def _modules(experts: dict[str, ExpertLora]) -> tuple[list[str], list[str]]:
    """The experts' layer keys (``unet.<module>``) and the UNet module paths they adapt."""
    layers = list(next(iter(experts.values())).layers)
    return layers, [layer.split(".", 1)[1] for layer in layers]


def input_norms(config: Config, experts: dict[str, ExpertLora], source: str) -> dict[str, torch.Tensor]:
    """Layer key -> ``mean |x|`` per input channel over every category's unsafe calibration inputs: (in,) from
    the base UNet, or (N, in) with each expert on."""
    pipe = load_pipeline(config.model)
    rows = calibration_rows(config)
    batch = calibration_batch(pipe, rows["unsafe_prompt"].tolist(), rows["unsafe_image"].tolist(),
                              config.merge.calibration_timesteps, config.merge.seed)
    layers, modules = _modules(experts)
    if source == "base":
        means = input_statistics(pipe.unet, modules, batch)
        return {layer: means[module] for layer, module in zip(layers, modules, strict=True)}
    slugs = [expert_slug(name) for name in experts]
    for name, slug in zip(experts, slugs, strict=True):
        pipe.load_lora_weights(layout.lora_file(expert_dir(config.run_root, name)), adapter_name=slug)
    means = input_statistics(pipe.unet, modules, batch, adapters=slugs)
    return {layer: means[module] for layer, module in zip(layers, modules, strict=True)}


def input_grams(config: Config, experts: dict[str, ExpertLora]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                          dict[str, torch.Tensor]]:
    """RegMean's Gram matrices on the base UNet: per expert over its category's unsafe calibration inputs,
    and over every category's safe twins (benign)."""
    pipe = load_pipeline(config.model)
    rows = calibration_rows(config)
    layers, modules = _modules(experts)

    def grams(prompts: list[str], images: list[bytes]) -> dict[str, torch.Tensor]:
        batch = calibration_batch(pipe, prompts, images, config.merge.calibration_timesteps, config.merge.seed)
        stats = input_statistics(pipe.unet, modules, batch, gram=True)
        return {layer: stats[module] for layer, module in zip(layers, modules, strict=True)}

    per_expert = {}
    for name in experts:
        expert_rows = rows[rows["category"] == name]
        if expert_rows.empty:
            raise MergeError(f"RegMean: no validation pairs of expert {name!r}'s categories to calibrate on")
        per_expert[name] = grams(expert_rows["unsafe_prompt"].tolist(), expert_rows["unsafe_image"].tolist())
    return per_expert, grams(rows["safe_prompt"].tolist(), rows["safe_image"].tolist())


def merge_with(config: Config, settings: MergeSettings, experts: dict[str, ExpertLora],
               norms: dict[str, torch.Tensor] | None = None) -> MergedLora:
    """``experts`` merged as ``settings`` say (``norms``: Co-Merge's calibration, measured when None)."""
    weights = {name: settings.weights.get(name, 1.0) for name in experts}
    if settings.method == "average":
        weights = {name: w / len(experts) for name, w in weights.items()}
    if settings.method == "regmean":
        grams, benign = input_grams(config, experts)
        return regmean(experts, grams, benign, weights=weights, lam=settings.scale, beta=settings.preserve,
                       rank=settings.rank)
    if settings.method == "comerge" and norms is None:
        norms = input_norms(config, experts, settings.input_source)
    return merge(experts, _METHOD[settings.method], weights=weights, lam=settings.scale, density=settings.density,
                 granularity=settings.granularity, input_norms=norms if settings.method == "comerge" else None,
                 rank=settings.rank, seed=settings.seed)


def merge_fingerprint(config: Config, settings: MergeSettings, experts: dict[str, str]) -> str:
    """Hash of the experts' own fingerprints, the settings and (for Co-Merge) the calibration."""
    trained = {n: storage.read_json(storage.join(f, layout.EXPERT_JSON))["fingerprint"] for n, f in experts.items()}
    calibration = (config.merge.calibration_prompts_per_category, config.merge.calibration_timesteps)
    return storage.fingerprint(trained, asdict(settings.relevant()),
                               calibration if settings.method in ("comerge", "regmean") else None)


def build_merge(config: Config, settings: MergeSettings, folder: str,
                experts: dict[str, ExpertLora] | None = None,
                norms: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Merge the finished experts into ``folder`` (skipped when its ``merge.json`` matches); its record."""
    record_path = storage.join(folder, layout.MERGE_JSON)
    fp = merge_fingerprint(config, settings, finished_experts(config))
    if storage.exists(record_path) and (record := storage.read_json(record_path)).get("fingerprint") == fp:
        return record | {"reused": True}
    start = time.perf_counter()
    experts = experts or load_experts(config)
    merged = merge_with(config, settings, experts, norms)
    worst = max(merged.errors.values(), default=0.0)
    if worst > config.merge.svd_error_warn:
        logger.warning("merge %s: SVD export error up to %.3f (layer %s) exceeds merge.svd_error_warn %.3f; "
                       "raise merge.rank", settings.method, worst, max(merged.errors, key=merged.errors.get),
                       config.merge.svd_error_warn)
    record = {"fingerprint": fp, "settings": asdict(settings.relevant()), "experts": list(experts),
              "svd_error_max": worst, "svd_errors": merged.errors, "seconds": time.perf_counter() - start,
              "lora": layout.lora_file(folder)}
    save_merged(merged, folder, {"settings": record["settings"], "experts": record["experts"]})
    storage.write_json(record_path, record)  # last: the merge is complete iff it exists
    return record | {"reused": False}
