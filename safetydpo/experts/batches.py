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


def dpo_inputs(batch: dict[str, np.ndarray], dpo: DPOConfig, rng: np.random.Generator,
               resolution: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Winner (safe) and loser (unsafe) pixels, captions as ``dpo.pairing`` says, and each caption's anchor
    (the safe prompt of its pair). A dropped caption drops its anchor too: "" stays ""."""
    winners = pixels(batch["safe_image"], resolution, batch["pair_id"])
    losers = pixels(batch["unsafe_image"], resolution, batch["pair_id"])
    if dpo.random_flip:
        flip = rng.random(len(winners)) < 0.5  # one flip per pair: winner and loser stay aligned
        winners[flip], losers[flip] = winners[flip, ..., ::-1], losers[flip, ..., ::-1]
    unsafe, safe = batch["unsafe_prompt"].tolist(), batch["safe_prompt"].tolist()
    captions = {"unsafe": unsafe, "safe": safe, "both": unsafe + safe}[dpo.pairing]
    anchors = safe + safe if dpo.pairing == "both" else safe
    if dpo.pairing == "both":
        winners, losers = np.concatenate([winners, winners]), np.concatenate([losers, losers])
    drop = rng.random(len(captions)) < dpo.caption_dropout
    return (winners, losers, ["" if d else c for c, d in zip(captions, drop, strict=True)],
            ["" if d else a for a, d in zip(anchors, drop, strict=True)])


def step_inputs(pipe, dpo: DPOConfig, batch: dict[str, np.ndarray], benign: dict[str, np.ndarray] | None,
                rng: np.random.Generator, resolution: int) -> dict[str, Any]:
    """:func:`~safetydpo.dpo.dpo_step`'s tensors for one micro-batch of pairs (and of benign rows when
    preservation is on): VAE latents and text states, each encoded in one call."""
    winners, losers, captions, anchors = dpo_inputs(batch, dpo, rng, resolution)
    images = [winners, losers]
    texts = list(captions) + (anchors if dpo.anchor_weight else [])
    if benign is not None:
        images.append(pixels(benign["safe_image"], resolution, benign["pair_id"]))
        texts += benign["safe_prompt"].tolist() + [""]
    unet, device = pipe.unet, pipe.unet.device
    with torch.no_grad():
        pixel_batch = torch.from_numpy(np.concatenate(images)).to(device, pipe.vae.dtype)
        # The posterior's mode, not a sample: a VAE trained with a weak KL term (the toy world's) has a
        # posterior std as large as its latents, and a sample is noise to a UNet trained on modes; SD's
        # VAE posterior is narrow, so there the two differ little.
        latents = pipe.vae.encode(pixel_batch).latent_dist.mode()
        latents = (latents * pipe.vae.config.scaling_factor).to(unet.dtype)
        states = pipe.encode_prompt(texts, device, 1, False)[0]
    n = len(captions)
    inputs = {"winner": latents[:n], "loser": latents[n:2 * n], "encoder_hidden_states": states[:n]}
    if dpo.anchor_weight:
        inputs["anchor_states"] = states[n:2 * n]
    if benign is not None:  # texts end with the benign captions, then ""
        m = len(benign["safe_prompt"])
        inputs["benign"] = Benign(latents[2 * n:], states[-m - 1:-1], states[-1:])
    return inputs
