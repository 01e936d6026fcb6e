"""Calibration: what the merged layers see. Per-channel input statistics of every LoRA'd layer.

Co-Merge judges an expert's activity at a weight by ``|dW[j, k]| * mean|x_k|`` (see
:mod:`safetydpo.merge.methods`), so a pass only needs, per layer, the mean magnitude of each input
channel: forward hooks add ``|x|`` up, and no activation tensor is kept. RegMean needs each layer's
input Gram matrix ``mean x x^T`` (in x in) per expert's category and on benign inputs. The inputs are the calibration
pairs' unsafe images, encoded and noised at sampled timesteps, with their unsafe prompts: inputs from
every category at once. ``base`` source: one pass of the LoRA-free UNet serves every expert; ``own``:
each expert's adapter on its own copy of the inputs, all experts in one batched pass (peft's mixed-batch
forward: one adapter name per sample).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from safetydpo.experts.batches import pixels


@dataclass(frozen=True)
class CalibrationBatch:
    """Noised latents of the calibration images at their timesteps, with their prompts' text states."""

    latents: torch.Tensor  # (n, C, h, w)
    timesteps: torch.Tensor  # (n,)
    states: torch.Tensor  # (n, tokens, dim)

    def repeat(self, times: int) -> CalibrationBatch:
        """The batch ``times`` over, copy after copy."""
        return CalibrationBatch(self.latents.repeat(times, 1, 1, 1), self.timesteps.repeat(times),
                                self.states.repeat(times, 1, 1))


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
def _input_statistics(unet: torch.nn.Module, modules: Sequence[str], gram: bool,
                      groups: list[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that make the yielded dict hold, after the body's forwards, each named module's input statistic
    over samples, tokens and positions: ``mean |x_k|`` per input channel (G, in), or with ``gram`` the mean
    outer product ``mean x x^T`` (G, in, in). Before each forward the body sets ``groups[0]``: each sample's
    group index (G groups)."""
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            x = args[0].detach().float()
            per_sample = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, tokens, in)
            group = groups[0].to(x.device)
            for g in group.unique().tolist():
                flat = per_sample[group == g].reshape(-1, x.shape[-1])
                stat = flat.T @ flat if gram else flat.abs().sum(dim=0)
                key = (name, g)
                sums[key] = sums[key] + stat if key in sums else stat
                counts[key] = counts.get(key, 0) + flat.shape[0]
        return record

    handles = [unet.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    stats: dict[str, torch.Tensor] = {}
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    seen = {name: sorted(g for n, g in counts if n == name) for name in modules}
    missing = [name for name, g in seen.items() if not g]
    if missing:
        raise RuntimeError(f"calibration: no input reached {missing[:3]}")
    stats.update({name: torch.stack([sums[name, g] / counts[name, g] for g in g_list]).cpu()
                  for name, g_list in seen.items()})


@contextmanager
def _mixed_adapters(unet: torch.nn.Module, names: list[Sequence[str]]) -> Iterator[None]:
    """Every LoRA layer of ``unet`` runs the adapter ``names[0][i]`` on sample i (peft's mixed-batch forward)."""
    def inject(_module, args, kwargs):
        return args, kwargs | {"adapter_names": list(names[0])}

    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in unet.modules()
               if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_statistics(unet: torch.nn.Module, modules: Sequence[str], batch: CalibrationBatch, gram: bool = False,
                     micro_batch: int = 64, adapters: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Each named module's ``mean |x_k|`` (in,) (or, with ``gram``, ``mean x x^T``) over one pass of ``batch``
    through ``unet`` as it is now.

    ``adapters``: the loaded peft adapters, each run on its own copy of ``batch`` in the same batched forwards;
    the statistics are then per adapter, stacked in that order: (len(adapters), in)."""
    names = list(adapters or [])
    copies = max(len(names), 1)
    full = batch.repeat(copies) if names else batch
    group_of = torch.arange(copies).repeat_interleave(len(batch.timesteps))
    groups: list[torch.Tensor] = [group_of]
    current: list[Sequence[str]] = [[]]
    with (torch.no_grad(), _input_statistics(unet, modules, gram, groups) as stats,
          _mixed_adapters(unet, current) if names else nullcontext()):
        for i in range(0, len(full.timesteps), micro_batch):
            part = slice(i, i + micro_batch)
            groups[0] = group_of[part]
            current[0] = [names[g] for g in group_of[part].tolist()] if names else []
            unet(full.latents[part], full.timesteps[part], encoder_hidden_states=full.states[part])
    return stats if names else {name: stat[0] for name, stat in stats.items()}
