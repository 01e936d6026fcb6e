"""From a batch of pair rows to the tensors of one DPO step: pixels, captions, latents, text states.

Pure functions of a batch and a random generator, shared by the Ray Train worker and the plain-loop
benchmarks (``jobs/benchmarks/expert_objectives.py``), so both train on exactly the same inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from safetydpo.config import DPOConfig
from safetydpo.dpo import Benign
from safetydpo.experts.spec import ExpertError
from safetydpo.pipelines import decode_png


def pixels(images: np.ndarray, resolution: int, pair_ids: np.ndarray) -> np.ndarray:
    """PNG bytes -> float32 (N, 3, H, W) in [-1, 1]."""
    decoded = np.stack([decode_png(b) for b in images])
    if decoded.shape[1:3] != (resolution, resolution):
        raise ExpertError(f"pair {pair_ids[0]!r}: images are {decoded.shape[1]}x{decoded.shape[2]}, "
                          f"the model trains at {resolution}x{resolution}")
    return decoded.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def _captions(batch: dict[str, np.ndarray], dpo: DPOConfig, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Captions as ``dpo.pairing`` says and each one's anchor (the safe prompt of its pair). A dropped caption
    drops its anchor too: "" stays ""."""
    unsafe, safe = batch["unsafe_prompt"].tolist(), batch["safe_prompt"].tolist()
    captions = {"unsafe": unsafe, "safe": safe, "both": unsafe + safe}[dpo.pairing]
    anchors = safe + safe if dpo.pairing == "both" else safe
    drop = rng.random(len(captions)) < dpo.caption_dropout
    return (["" if d else c for c, d in zip(captions, drop, strict=True)],
            ["" if d else a for a, d in zip(anchors, drop, strict=True)])


def dpo_inputs(batch: dict[str, np.ndarray], dpo: DPOConfig, rng: np.random.Generator,
               resolution: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Winner (safe) and loser (unsafe) pixels, captions as ``dpo.pairing`` says, and each caption's anchor."""
    winners = pixels(batch["safe_image"], resolution, batch["pair_id"])
    losers = pixels(batch["unsafe_image"], resolution, batch["pair_id"])
    if dpo.random_flip:
        flip = rng.random(len(winners)) < 0.5  # one flip per pair: winner and loser stay aligned
        winners[flip], losers[flip] = winners[flip, ..., ::-1], losers[flip, ..., ::-1]
    if dpo.pairing == "both":
        winners, losers = np.concatenate([winners, winners]), np.concatenate([losers, losers])
    return winners, losers, *_captions(batch, dpo, rng)


def _encode(pipe, images: np.ndarray) -> torch.Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] -> scaled VAE latents in the UNet's dtype.

    The posterior's mode, not a sample: a VAE trained with a weak KL term (the toy world's) has a posterior
    std as large as its latents, and a sample is noise to a UNet trained on modes; SD's VAE posterior is
    narrow, so there the two differ little.
    """
    with torch.no_grad():
        pixel_batch = torch.from_numpy(images).to(pipe.unet.device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixel_batch).latent_dist.mode()
    return (latents * pipe.vae.config.scaling_factor).to(pipe.unet.dtype)


class LatentCache:
    """VAE latents of training images by (pair id, image column), encoded the first time a batch holds them.

    An expert sees its few hundred images again and again; on the toy model re-encoding them was ~8% of a
    step. Held on the CPU. Not used with ``dpo.random_flip`` (a flipped image is another input).
    """

    def __init__(self) -> None:
        self._latents: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._latents)

    def latents(self, pipe, column: str, batch: dict[str, np.ndarray], resolution: int) -> torch.Tensor:
        """Latents of ``batch[column]`` (N, C, h, w), on the UNet's device."""
        keys = [(column, str(i)) for i in batch["pair_id"]]
        new = {k: row for row, k in enumerate(keys) if k not in self._latents}
        if new:
            rows = np.array(list(new.values()))
            images = pixels(batch[column][rows], resolution, batch["pair_id"][rows])
            # One image per call: a latent is then a function of its image alone, not of the batch it first came
            # in (batched kernels round apart), so a resumed run trains on the same bits as an uninterrupted one.
            encoded = torch.cat([_encode(pipe, images[i:i + 1]) for i in range(len(images))]).cpu()
            self._latents.update(zip(new, encoded, strict=True))
        return torch.stack([self._latents[k] for k in keys]).to(pipe.unet.device)


def step_inputs(pipe, dpo: DPOConfig, batch: dict[str, np.ndarray], benign: dict[str, np.ndarray] | None,
                rng: np.random.Generator, resolution: int, cache: LatentCache | None = None) -> dict[str, Any]:
    """:func:`~safetydpo.dpo.dpo_step`'s tensors for one micro-batch of pairs (and of benign rows when
    preservation is on): VAE latents (from ``cache`` when given and images are not flipped) and text states."""
    if cache is not None and not dpo.random_flip:
        captions, anchors = _captions(batch, dpo, rng)
        repeat = 2 if dpo.pairing == "both" else 1
        parts = [cache.latents(pipe, "safe_image", batch, resolution).repeat(repeat, 1, 1, 1),
                 cache.latents(pipe, "unsafe_image", batch, resolution).repeat(repeat, 1, 1, 1)]
        if benign is not None:
            parts.append(cache.latents(pipe, "safe_image", benign, resolution))
        latents = torch.cat(parts)
    else:
        winners, losers, captions, anchors = dpo_inputs(batch, dpo, rng, resolution)
        images = [winners, losers]
        if benign is not None:
            images.append(pixels(benign["safe_image"], resolution, benign["pair_id"]))
        latents = _encode(pipe, np.concatenate(images))
    texts = list(captions) + (anchors if dpo.anchor_weight else [])
    if benign is not None:
        texts += benign["safe_prompt"].tolist() + [""]
    with torch.no_grad():
        states = pipe.encode_prompt(texts, pipe.unet.device, 1, False)[0]
    n = len(captions)
    inputs = {"winner": latents[:n], "loser": latents[n:2 * n], "encoder_hidden_states": states[:n]}
    if dpo.anchor_weight:
        inputs["anchor_states"] = states[n:2 * n]
    if benign is not None:  # texts end with the benign captions, then ""
        m = len(benign["safe_prompt"])
        inputs["benign"] = Benign(latents[2 * n:], states[-m - 1:-1], states[-1:])
    return inputs
