"""Calibration: what the merged layers see. Per-channel input statistics of every LoRA'd layer.

Co-Merge judges an expert's activity at a weight by ``|dW[j, k]| * mean|x_k|`` (see
:mod:`safetydpo.merge.methods`), so a pass only needs, per layer, the mean magnitude of each input
channel: forward hooks add ``|x|`` up, and no activation tensor is kept. RegMean needs each layer's
input Gram matrix ``mean x x^T`` (in x in) per expert's category and on benign inputs. The inputs are the calibration
pairs' unsafe images, encoded and noised at sampled timesteps, with their unsafe prompts: inputs from
every category at once. ``base`` source: one pass of the LoRA-free UNet serves every expert; ``own``:
one pass per expert with that expert's adapter on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from safetydpo.experts.batches import pixels


@dataclass(frozen=True)
class CalibrationBatch:
    """Noised latents of the calibration images at their timesteps, with their prompts' text states."""

    latents: torch.Tensor  # (n, C, h, w)
    timesteps: torch.Tensor  # (n,)
    states: torch.Tensor  # (n, tokens, dim)


def calibration_batch(pipe, prompts: Sequence[str], images: Sequence[bytes], timesteps: int,
                      seed: int) -> CalibrationBatch:
    """Every (image, prompt) at ``timesteps`` noise levels drawn with ``seed``: n = len(prompts) x timesteps."""
    unet, device = pipe.unet, pipe.unet.device
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    ids = np.array([f"calibration {i}" for i in range(len(prompts))])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.from_numpy(pixels(np.array(images, dtype=object), resolution, ids)).to(device, pipe.vae.dtype)
        latents = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
        states = pipe.encode_prompt(list(prompts), device, 1, False)[0]
    n_train = pipe.scheduler.config.num_train_timesteps
    t = torch.randint(0, n_train, (timesteps, len(prompts)), generator=generator).flatten()
    latents = latents.repeat(timesteps, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy = pipe.scheduler.add_noise(latents, noise, t.to(device))
    return CalibrationBatch(noisy.to(unet.dtype), t.to(device), states.repeat(timesteps, 1, 1).to(unet.dtype))


@contextmanager
def _input_statistics(unet: torch.nn.Module, modules: Sequence[str],
                      gram: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that make the yielded dict hold, after the body's forwards, each named module's input statistic
    over samples, tokens and positions: ``mean |x_k|`` per input channel (in,), or with ``gram`` the mean
    outer product ``mean x x^T`` (in x in)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(modules, 0)

    def hook(name: str):
        def record(_module, args) -> None:
            x = args[0].detach().float()
            flat = x.reshape(-1, x.shape[-1])
            stat = flat.T @ flat if gram else flat.abs().sum(dim=0)
            sums[name] = sums[name] + stat if name in sums else stat
            counts[name] += flat.shape[0]
        return record

    handles = [unet.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    stats: dict[str, torch.Tensor] = {}
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if not counts[name]]
    if missing:
        raise RuntimeError(f"calibration: no input reached {missing[:3]}")
    stats.update({name: (sums[name] / counts[name]).cpu() for name in modules})


def input_statistics(unet: torch.nn.Module, modules: Sequence[str], batch: CalibrationBatch, gram: bool = False,
                     micro_batch: int = 64) -> dict[str, torch.Tensor]:
    """Each named module's ``mean |x_k|`` (or, with ``gram``, ``mean x x^T``) over one pass of ``batch`` through
    ``unet`` as it is now (with whatever adapters are active)."""
    with torch.no_grad(), _input_statistics(unet, modules, gram) as stats:
        for i in range(0, len(batch.timesteps), micro_batch):
            part = slice(i, i + micro_batch)
            unet(batch.latents[part], batch.timesteps[part], encoder_hidden_states=batch.states[part])
    return stats
