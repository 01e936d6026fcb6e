"""Preference pairs: the model being aligned renders both prompts of every pair, on Ray Data.

:func:`generate_pairs` renders the pair table of ``config.data`` into
``<run_root>/pairs/<fingerprint>/``, where the fingerprint hashes everything the images depend
on (the weights, precision, sampler settings, batch size and the pair table itself)::

    shard-00000.parquet ...  one file per shard of ``generation.batch_size`` pairs, written atomically
    manifest.json            written last: the dataset is complete iff it exists

A shard is also exactly the batch one actor renders in one call, so the batch an image was
computed in, and with it every bit of the image on CPU, is a function of the config alone: a
resumed run renders what an uninterrupted one would have. Both images of a pair are drawn from
the pair's one seed (the paper's minimal-difference pairs). Actors render; the driver collects
each shard's rows and writes the shard as one atomic file, so a killed run leaves whole shards
and nothing half-written, and the rerun renders only the missing ones. (Ray Data's own
``write_parquet`` writes files in place, where a kill leaves a truncated file; diffusion is
compute bound, and the few MB/s of PNGs it produces pass through the driver at no cost.)
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone

import mlflow
import numpy as np
import pandas as pd
import ray
import torch

from safetydpo import storage, tracking
from safetydpo.categories import CATEGORIES, category_slug
from safetydpo.config import Config, GenerationConfig, ModelConfig
from safetydpo.data.pairs import (
    MANIFEST,
    PromptPairs,
    build_pairs,
    finished_shards,
    read_pairs_pandas,
    remove_stale_temp_files,
    shard_name,
    shard_rows,
    write_shard,
)
from safetydpo.pipelines import decode_png, model_fingerprint, resolve_dtype
from safetydpo.plots import image_grid
from safetydpo.rendering import PromptRenderer

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = {"unsafe_prompt": "unsafe_image", "safe_prompt": "safe_image"}


def render_device(generation: GenerationConfig) -> torch.device:
    """Where actors render: a GPU when they are given one (Ray hides GPUs from the others)."""
    return torch.device("cuda" if generation.num_gpus_per_actor > 0 else "cpu")


def model_id(model: ModelConfig) -> str:
    """The ``model_id`` column: what was loaded, e.g. ``toy`` or ``stabilityai/stable-diffusion-2-1@main``."""
    return f"{model.pretrained}@{model.revision}" if model.revision else model.pretrained


def dataset_fingerprint(config: Config, table: pd.DataFrame) -> str:
    """Hash of what the images depend on. Actor and CPU counts are left out: they change speed only."""
    generation = config.generation
    device = render_device(generation)
    return storage.fingerprint(
        {"model": config.model.model_dump(mode="json"), "weights": model_fingerprint(config.model),
         "device": device.type, "dtype": str(resolve_dtype(config.model.dtype, device))},
        {"num_inference_steps": generation.num_inference_steps, "guidance_scale": generation.guidance_scale,
         "negative_prompt": generation.negative_prompt, "batch_size": generation.batch_size},
        table.to_dict("records"),
    )


def pairs_location(config: Config, pairs: PromptPairs | None = None) -> str:
    """``<run_root>/pairs/<fingerprint>``: where the pairs of ``config`` are (or will be)."""
    table = (pairs or build_pairs(config.data)).table
    return storage.join(config.run_root, "pairs", dataset_fingerprint(config, table))


class PairRenderer(PromptRenderer):
    """Renders the unsafe and the safe prompt of each pair from the pair's seed, one whole shard
    per call. The shard is checked, since the batch an image is rendered in fixes its bits."""

    def __init__(self, model: ModelConfig, generation: GenerationConfig, num_pairs: int) -> None:
        super().__init__(model, generation, IMAGE_COLUMNS)
        self.num_pairs = num_pairs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = np.unique(batch["shard"])
        size = self.generation.batch_size
        expected = min(size, self.num_pairs - int(shards[0]) * size)
        if len(shards) != 1 or len(batch["shard"]) != expected:
            raise RuntimeError(f"a render batch must be one whole shard; got shards {shards.tolist()} "
                               f"in {len(batch['shard'])} rows (expected {expected} rows of one shard)")
        return super().__call__(batch)


def _render_shards(config: Config, pending: pd.DataFrame,
                   num_pairs: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """Render ``pending`` on an actor pool; yields (shard, rows in pair order) as shards complete."""
    generation = config.generation
    blocks = [rows for _, rows in pending.groupby("shard", sort=True)]  # one input block per shard
    dataset = ray.data.from_pandas(blocks).map_batches(
        PairRenderer,
        fn_constructor_kwargs={"model": config.model, "generation": generation, "num_pairs": num_pairs},
        batch_size=generation.batch_size,
        compute=ray.data.ActorPoolStrategy(size=min(generation.num_actors, len(blocks))),
        num_gpus=generation.num_gpus_per_actor,
        num_cpus=generation.num_cpus_per_actor,
    )
    expected = pending.groupby("shard").size().to_dict()
    parts: dict[int, list[pd.DataFrame]] = defaultdict(list)
    for block in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        for shard, rows in block.groupby("shard", sort=False):
            parts[shard].append(rows)
            if sum(len(p) for p in parts[shard]) == expected[shard]:
                yield int(shard), pd.concat(parts.pop(shard)).sort_values("position")


def _manifest(config: Config, path: str, table: pd.DataFrame, pairs: PromptPairs,
              rendered: int, seconds: float) -> dict:
    files = [shard_name(s) for s in sorted(table["shard"].unique())]
    rows = shard_rows(path, files)
    if sum(rows.values()) != len(table):
        raise RuntimeError(f"{path}: shards hold {sum(rows.values())} pairs, expected {len(table)}")
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (category, split), n in table.groupby(["category", "split"]).size().items():
        counts[category][split] = int(n)
    return {
        "fingerprint": path.rstrip("/").rsplit("/", 1)[-1],
        "model_id": model_id(config.model),
        "files": files,
        "pairs": len(table),
        "images": 2 * len(table),
        "categories": {c: counts[c] for c in CATEGORIES if c in counts},
        "skipped_rows": pairs.skipped_rows,
        "config": {k: getattr(config, k).model_dump(mode="json") for k in ("model", "data", "generation")},
        "last_run": {
            "pairs_rendered": rendered,
            "seconds": round(seconds, 3),
            "pairs_per_s": round(rendered / seconds, 4) if rendered else None,
            "images_per_s": round(2 * rendered / seconds, 4) if rendered else None,
        },
        "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def generate_pairs(config: Config) -> str:
    """Render (or reuse, or finish) the pairs ``config`` selects; returns the finished dataset's path."""
    pairs = build_pairs(config.data)
    path = pairs_location(config, pairs)
    if storage.exists(storage.join(path, MANIFEST)):
        logger.info("pairs: reusing the finished dataset %s", path)
        return path
    size = config.generation.batch_size
    table = pairs.table.assign(model_id=model_id(config.model), position=np.arange(len(pairs.table)),
                               shard=np.arange(len(pairs.table)) // size)
    pending = table[~table["shard"].isin(finished_shards(path))]
    if len(pending) < len(table):
        logger.info("pairs: resuming %s, %d of %d pairs already rendered", path,
                    len(table) - len(pending), len(table))
    start = time.perf_counter()
    if len(pending):
        for shard, rows in _render_shards(config, pending, len(table)):
            write_shard(path, shard, rows)
    seconds = time.perf_counter() - start
    manifest = _manifest(config, path, table, pairs, len(pending), seconds)
    storage.write_json(storage.join(path, MANIFEST), manifest)
    remove_stale_temp_files(path)
    logger.info(summary_line(path))
    return path


def summary_line(path: str) -> str:
    """One line for the log: pairs, images written, throughput and where."""
    manifest = storage.read_json(storage.join(path, MANIFEST))
    run = manifest["last_run"]
    speed = (f"{run['pairs_per_s']:.2f} pairs/s, {run['images_per_s']:.2f} images/s"
             if run["pairs_rendered"] else "nothing to render, reused")
    return (f"pairs: {manifest['pairs']} pairs, {2 * run['pairs_rendered']} images written this run "
            f"({manifest['images']} in all) in {run['seconds']:.1f} s, {speed} -> {path}")


def sample_twins(path: str, per_category: int = 2) -> pd.DataFrame:
    """The first ``per_category`` pairs of each category, images included, read from only the
    shards that hold them."""
    index = read_pairs_pandas(path, columns=["pair_id", "category"])
    chosen = index.groupby("category", sort=False).head(per_category)["pair_id"].tolist()
    return read_pairs_pandas(path, filters=[("pair_id", "in", chosen)])


def twins_grid(path: str, per_category: int = 2):
    """A PIL grid: a row per category of (unsafe, safe twin) image pairs."""
    sample = sample_twins(path, per_category)
    rows, labels = [], []
    for category, group in sample.groupby("category", sort=False):
        rows.append([decode_png(image) for pair in group.itertuples()
                     for image in (pair.unsafe_image, pair.safe_image)])
        labels.append(category)
    return image_grid(rows, row_labels=labels, col_labels=["unsafe", "safe"] * per_category)


def log_generation(path: str, per_category: int = 2) -> dict[str, float]:
    """Log a finished dataset to the active MLflow run: config, counts, throughput and twin grid.

    Returns the metrics logged (the stage's headline numbers).
    """
    manifest = storage.read_json(storage.join(path, MANIFEST))
    params = {f"{section}.{key}": value for section, fields in manifest["config"].items()
              for key, value in fields.items()}
    tracking.log_params(params)
    mlflow.set_tags({"pairs.fingerprint": manifest["fingerprint"], "pairs.path": path})
    metrics: dict[str, float] = {"pairs/total": manifest["pairs"], "pairs/images": manifest["images"]}
    for category, splits in manifest["categories"].items():
        metrics[f"pairs/{category_slug(category)}"] = sum(splits.values())
        for split, n in splits.items():
            metrics[f"pairs/{split}"] = metrics.get(f"pairs/{split}", 0) + n
    metrics |= {f"pairs/skipped_rows/{k.replace(' ', '_')}": n for k, n in manifest["skipped_rows"].items()}
    run = manifest["last_run"]  # the run that finished the dataset: a reusing run renders nothing
    metrics["pairs/rendered_by_finishing_run"] = run["pairs_rendered"]
    if run["pairs_rendered"]:
        metrics |= {"pairs/pairs_per_s": run["pairs_per_s"], "pairs/images_per_s": run["images_per_s"],
                    "pairs/seconds": run["seconds"]}
    tracking.log_metrics(metrics)
    mlflow.log_dict(manifest, "pairs/manifest.json")
    tracking.log_image(twins_grid(path, per_category), "pairs/twins.png")
    return metrics
