"""Merge by distillation: refine a merged LoRA so that it does what each expert does on its own
category's inputs and what the base model does on benign inputs.

The weight-space merges (Co-Merge, linear, TIES, DARE, RegMean) combine the experts' weights without
looking at the network's output; on the toy world their deltas interfere once summed (see README,
"Merging the experts"). Here the merged adapter (the student, initialised from another merge) is
trained for ``steps`` steps:

- under a training pair's **unsafe prompt**, its noise prediction is pulled towards that category's
  expert's (the teacher: base + that expert's LoRA). The noisy latent is the pair's unsafe image or,
  for a ``winner_share`` of the samples, its safe twin: an expert prompted with the unsafe caption
  denoises *towards the safe twin*, so its late steps run near safe latents, which unsafe images alone
  never show the student;
- on the **safe twins**, under their captions and the empty caption (the unconditional branch of
  classifier-free guidance), towards the base model's.

The experts are used as they are; no preference data is re-rendered. Every image and caption is
encoded once; targets are computed a round of steps at a time, one adapter switch per expert per round
and batched forwards, rather than an adapter switch per category in every step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from peft.utils import get_peft_model_state_dict

from safetydpo import layout
from safetydpo.config import Config
from safetydpo.data.pairs import read_pairs_pandas
from safetydpo.dpo import per_sample_mse
from safetydpo.experts import expert_dir
from safetydpo.experts.batches import pixels
from safetydpo.experts.spec import expert_slug
from safetydpo.generation import pairs_location
from safetydpo.merge.lora_file import LoraFactors, MergedLora, save_merged
from safetydpo.pipelines import load_pipeline

STUDENT = "student"
ROUND_STEPS = 25  # steps whose targets are computed together (memory: ROUND_STEPS x 3 x batch latents)


@dataclass
class _Encoded:
    """Every training pair of the experts' categories, encoded once."""

    unsafe: torch.Tensor  # (P, C, h, w) latents of the unsafe images (VAE posterior mode, scaled)
    safe: torch.Tensor  # (P, C, h, w) latents of the safe twins
    unsafe_states: torch.Tensor  # (P, L, D) text states of the unsafe prompts
    safe_states: torch.Tensor  # (P, L, D) text states of the safe prompts
    empty_states: torch.Tensor  # (1, L, D) text states of ""
    category: np.ndarray  # (P,) each pair's category


def _encode_pairs(pipe, rows: pd.DataFrame, chunk: int) -> _Encoded:
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    device, dtype = pipe.unet.device, pipe.unet.dtype
    ids = rows["pair_id"].to_numpy()

    def latents(column: str) -> torch.Tensor:
        parts = []
        for start in range(0, len(rows), chunk):
            x = pixels(rows[column].to_numpy()[start:start + chunk], resolution, ids[start:start + chunk])
            parts.append(pipe.vae.encode(torch.from_numpy(x).to(device, pipe.vae.dtype)).latent_dist.mode())
        return (torch.cat(parts) * pipe.vae.config.scaling_factor).to(dtype)

    def states(prompts: list[str]) -> torch.Tensor:
        return torch.cat([pipe.encode_prompt(prompts[s:s + chunk], device, 1, False)[0]
                          for s in range(0, len(prompts), chunk)])

    with torch.no_grad():
        return _Encoded(latents("unsafe_image"), latents("safe_image"), states(rows["unsafe_prompt"].tolist()),
                        states(rows["safe_prompt"].tolist()), states([""]), rows["category"].to_numpy())


@dataclass
class _Round:
    """Inputs and targets of a round of steps, step-major: step s owns unsafe-prompt samples
    ``[s*b, (s+1)*b)`` and benign samples ``[2*s*b, 2*(s+1)*b)``."""

    unsafe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # noisy latents, t, states, target
    benign: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    b: int  # pairs per step

    def step(self, s: int) -> tuple[torch.Tensor, ...]:
        """Step ``s``'s noisy latents, timesteps, text states and targets, unsafe-prompt samples first."""
        u = [x[s * self.b:(s + 1) * self.b] for x in self.unsafe]
        g = [x[2 * s * self.b:2 * (s + 1) * self.b] for x in self.benign]
        return tuple(torch.cat(pair) for pair in zip(u, g, strict=True))


def _round(pipe, data: _Encoded, steps: int, batch_size: int, winner_share: float, rng: np.random.Generator,
           generator: torch.Generator, chunk: int) -> _Round:
    """Draw ``steps`` steps' samples and compute their targets: each expert once over its own samples, the
    base model once over the benign ones."""
    b = min(batch_size, len(data.category))
    rows = np.stack([rng.choice(len(data.category), b, replace=False) for _ in range(steps)])  # (steps, b)
    index = torch.from_numpy(rows.reshape(-1))
    winner = torch.from_numpy(rng.random(len(index)) < winner_share)[:, None, None, None]
    # Benign: each step's safe twins under their captions, then under "" (index P of the state table).
    twins = torch.from_numpy(np.concatenate([rows, rows], axis=1).reshape(-1))
    captions = torch.from_numpy(np.concatenate([rows, np.full_like(rows, len(data.category))], axis=1).reshape(-1))
    benign_states = torch.cat([data.safe_states, data.empty_states])[captions]
    unet = pipe.unet

    def noised(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn on the CPU generator, so a run is the same on any device.
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = t.to(latents.device)
        return pipe.scheduler.add_noise(latents, noise, t), t

    def predict(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([unet(x[s:s + chunk], t[s:s + chunk], encoder_hidden_states=c[s:s + chunk]).sample
                          for s in range(0, len(x), chunk)])

    x_u, t_u = noised(torch.where(winner, data.safe[index], data.unsafe[index]))
    c_u = data.unsafe_states[index]
    x_b, t_b = noised(data.safe[twins])
    category = data.category[rows.reshape(-1)]
    with torch.no_grad():
        teacher = torch.empty_like(x_u)
        for name in np.unique(category):
            where = torch.from_numpy(np.flatnonzero(category == name))
            pipe.set_adapters(expert_slug(name))
            teacher[where] = predict(x_u[where], t_u[where], c_u[where])
        pipe.disable_lora()
        base = predict(x_b, t_b, benign_states)
        pipe.enable_lora()
    return _Round((x_u, t_u, c_u, teacher), (x_b, t_b, benign_states, base), b)


def distill(config: Config, experts: list[str], init: MergedLora, *, steps: int, lr: float = 1e-3,
            batch_size: int = 16, seed: int = 0, winner_share: float = 0.5,
            expert_files: dict[str, str] | None = None) -> MergedLora:
    """``init`` trained ``steps`` steps towards the experts (on their categories) and the base (on benign).

    Each expert's LoRA is read from ``expert_files[name]`` when given, else from the run root's expert folder.
    """
    pipe = load_pipeline(config.model)
    unet = pipe.unet
    with tempfile.TemporaryDirectory() as tmp:
        pipe.load_lora_weights(save_merged(init, tmp), adapter_name=STUDENT)
    for name in experts:
        location = (expert_files or {}).get(name) or expert_dir(config.run_root, name)
        pipe.load_lora_weights(layout.lora_file(location), adapter_name=expert_slug(name))
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if f".{STUDENT}." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    columns = ["pair_id", "category", "split", "unsafe_prompt", "unsafe_image", "safe_prompt", "safe_image"]
    rows = read_pairs_pandas(pairs_location(config), columns=columns, filters=[("split", "=", "train")])
    rows = rows[rows["category"].isin(experts)].reset_index(drop=True)
    chunk = 4 * batch_size
    data = _encode_pairs(pipe, rows, chunk)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for start in range(0, steps, ROUND_STEPS):
        count = min(ROUND_STEPS, steps - start)
        todo = _round(pipe, data, count, batch_size, winner_share, rng, generator, chunk)
        pipe.set_adapters(STUDENT)
        for s in range(count):
            x, t, c, target = todo.step(s)
            loss = per_sample_mse(unet(x, t, encoder_hidden_states=c).sample, target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    state = get_peft_model_state_dict(unet, adapter_name=STUDENT)
    layers = {}
    for key in (k for k in state if k.endswith("lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        layers[f"unet.{module}"] = LoraFactors(state[key].detach().float(),
                                               state[f"{module}.lora_B.weight"].detach().float())
    return MergedLora(layers, dict.fromkeys(layers, 0.0))
