"""Evaluation in one process: render a prompts table with one LoRA, classify, summarise.

The evaluation stage fans out over Ray Data actor pools; a Ray Tune trial of the merge search already
is one worker with its resources, so it renders and classifies its validation prompts right here, with
the same renderer, classifiers and metrics as the stage (so its figures mean what the stage's mean).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safetydpo.config import Config
from safetydpo.data.pairs import build_pairs
from safetydpo.evaluation import benchmarks, metrics
from safetydpo.evaluation.classifiers import BatchClassifier
from safetydpo.rendering import PromptRenderer


def validation_prompts(config: Config) -> pd.DataFrame:
    """The validation split as a prompts table (unsafe prompts and their safe twins): the toy world draws
    ``tune.validation_prompts_per_category`` pairs from its validation layouts; other sources use the
    pair table's validation rows. Never the test split: the merge search is tuned on this."""
    if config.data.source == "toy":
        return benchmarks.load_toy(config.tune.validation_prompts_per_category, config.data.seed, split="validation")
    rows = build_pairs(config.data).table
    rows = rows[rows["split"] == "validation"]
    return benchmarks.pair_prompts(rows["pair_id"].tolist(), rows["unsafe_prompt"].tolist(),
                                   rows["safe_prompt"].tolist(), rows["category"].tolist(), rows["seed"].tolist())


def _column(values: np.ndarray) -> list | np.ndarray:
    """A batch column as a DataFrame column: rows of a 2-D array (feature vectors) become one array each."""
    return list(values) if values.ndim > 1 else values


def score(config: Config, table: pd.DataFrame, lora_path: str | None) -> dict[str, float]:
    """Metrics of the base model with ``lora_path`` on ``table`` (one image per prompt), as the stage computes them."""
    gen = config.generation
    images = benchmarks.expand_images(table, 1)
    rows = images[["image_id", "prompt", "seed", "guidance_scale"]].copy()
    rows["guidance_scale"] = rows["guidance_scale"].fillna(gen.guidance_scale)
    renderer = PromptRenderer(config.model, gen, {"prompt": "image"}, lora_path=lora_path)
    classifier = BatchClassifier(config.eval)
    parts = []
    for start in range(0, len(rows), gen.batch_size):
        batch = {c: rows[c].to_numpy()[start:start + gen.batch_size] for c in rows.columns}
        scored = classifier(renderer(batch))
        parts.append(pd.DataFrame({k: _column(v) for k, v in scored.items()
                                   if k not in ("image", "prompt", "seed", "guidance_scale")}))
    scores = pd.concat(parts, ignore_index=True)
    return metrics.summarize(images.merge(scores, on="image_id", validate="one_to_one"), list(config.eval.classifiers))
