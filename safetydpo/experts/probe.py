"""One expert trained in-process without Ray: the Ray Train worker's own step
(:func:`~safetydpo.experts.batches.step_inputs` + :func:`~safetydpo.dpo.dpo_step`) in a plain loop.

For benchmarks and sweeps that train many small variants side by side on the same batches, timesteps and
noise (``jobs/benchmarks/expert_objectives.py``, ``jobs/benchmarks/paper_objective.py``); the experts stage
itself always trains through Ray Train.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from diffusers import DiffusionPipeline

from safetydpo.config import Config, DPOConfig
from safetydpo.dpo import dpo_step
from safetydpo.experts.batches import LatentCache, step_inputs
from safetydpo.lora import add_lora
from safetydpo.pipelines import load_pipeline

PAIR_COLUMNS = ["pair_id", "category", "split", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image"]


def batch_rows(frame: pd.DataFrame, index: np.ndarray) -> dict[str, np.ndarray]:
    """A batch in the form Ray Data hands the trainer (numpy columns, PNG bytes as objects)."""
    return {c: frame[c].to_numpy()[index] for c in frame.columns}


def train_steps(config: Config, dpo: DPOConfig, own: pd.DataFrame, benign: pd.DataFrame,
                seed: int) -> Iterator[tuple[int, DiffusionPipeline, dict[str, float]]]:
    """Train a fresh LoRA on ``own`` pairs (``benign`` rows for the preservation term) for ``dpo.max_steps``
    steps, yielding ``(steps done, pipeline, the step's metrics)`` after each; the pipeline carries the LoRA.

    Both row draws happen every step whatever ``dpo`` switches on, so variants of one seed see the same
    pair batches. A caller that renders between steps puts the UNet in eval mode and back.
    """
    pipe = load_pipeline(config.model)
    unet = pipe.unet
    params = add_lora(unet, dpo)
    optimizer = torch.optim.AdamW(params, lr=dpo.learning_rate, weight_decay=dpo.weight_decay)
    resolution = config.model.resolution or unet.config.sample_size * pipe.vae_scale_factor
    rng, cache = np.random.default_rng(seed), LatentCache()
    for step in range(dpo.max_steps):
        batch = batch_rows(own, rng.choice(len(own), min(dpo.batch_size, len(own)), replace=False))
        extra = batch_rows(benign, rng.choice(len(benign), min(dpo.batch_size, len(benign)), replace=False))
        inputs = step_inputs(pipe, dpo, batch, extra if dpo.preserve_weight else None,
                             np.random.default_rng([seed, step]), resolution, cache)
        out = dpo_step(unet, pipe.scheduler, **inputs, beta=dpo.beta, sft_weight=dpo.sft_weight,
                       anchor_weight=dpo.anchor_weight, preserve_weight=dpo.preserve_weight,
                       generator=torch.Generator().manual_seed(seed * 100_003 + step))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, dpo.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield step + 1, pipe, {k: float(v) for k, v in out.metrics.items()}


def train(config: Config, dpo: DPOConfig, own: pd.DataFrame, benign: pd.DataFrame, seed: int) -> DiffusionPipeline:
    """The pipeline with a LoRA expert trained ``dpo.max_steps`` steps (:func:`train_steps` run out), in eval mode."""
    steps = train_steps(config, dpo, own, benign, seed)
    *_, (_, pipe, _) = steps
    pipe.unet.eval()
    return pipe
