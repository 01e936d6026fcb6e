"""Rendering prompts with the pipeline: the one code path preference data, evaluation and
serving share, so an image is a function of (model, prompt, seed, settings) alone.

Each image gets its own ``torch.Generator`` seeded from its row, so it does not depend on
which other prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from safetydpo.config import GenerationConfig, ModelConfig
from safetydpo.pipelines import load_pipeline, png_bytes


def render(pipe: DiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], *,
           num_inference_steps: int, guidance_scale: float, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, **pipe_kwargs: Any) -> np.ndarray:
    """uint8 (N, H, W, 3) images for ``prompts``, image i drawn from ``seeds[i]``.

    ``pipe_kwargs`` go to the pipeline call as they are (e.g. Safe Latent Diffusion's ``sld_*``).
    """
    device = pipe.device if pipe.device.type != "mps" else torch.device("cpu")
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    out = pipe(
        list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        generator=generators, height=height, width=width, output_type="np", **pipe_kwargs,
    ).images
    return np.clip(np.rint(np.asarray(out, dtype=np.float32) * 255), 0, 255).astype(np.uint8)


class PromptRenderer:
    """Ray Data ``map_batches`` callable: the pipeline loads once per actor, then renders batches.

    ``columns`` maps prompt columns to the image columns they fill (e.g. the unsafe and the
    safe prompt of a pair, drawn from the row's one ``seed``). Optional per-row
    ``guidance_scale`` (I2P) is honoured. Images leave as PNG bytes.
    """

    def __init__(self, model: ModelConfig, generation: GenerationConfig, columns: dict[str, str],
                 lora_path: str | None = None, pipe_kwargs: Mapping[str, Any] | None = None) -> None:
        self.generation = generation
        self.columns = columns
        self.pipe_kwargs = dict(pipe_kwargs or {})
        self.pipe = load_pipeline(model)
        self.size = model.resolution  # None: the pipeline's default (the UNet's sample size x VAE factor)
        if lora_path:
            self.pipe.load_lora_weights(lora_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["seed"])
        guidance = batch.get("guidance_scale")
        guidance = np.full(n, self.generation.guidance_scale) if guidance is None else guidance.astype(float)
        for prompt_col, image_col in self.columns.items():
            images: list[bytes | None] = [None] * n
            for g in np.unique(guidance):
                rows = np.flatnonzero(guidance == g)
                rendered = render(
                    self.pipe, batch[prompt_col][rows].tolist(), batch["seed"][rows].tolist(),
                    num_inference_steps=self.generation.num_inference_steps, guidance_scale=float(g),
                    negative_prompt=self.generation.negative_prompt, height=self.size, width=self.size,
                    **self.pipe_kwargs,
                )
                for row, image in zip(rows, rendered, strict=True):
                    images[row] = png_bytes(image)
            batch[image_col] = np.array(images, dtype=object)
        return batch
