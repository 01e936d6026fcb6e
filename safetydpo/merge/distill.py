"""Merge by distillation: refine a merged LoRA so that it does what each expert does on its own
category's inputs and what the base model does on benign inputs.

The weight-space merges (Co-Merge, linear, TIES, DARE, RegMean) combine the experts' weights without
looking at the network's output; on the toy world their deltas interfere once summed (see README,
"Merging the experts"). Here the merged adapter (the student, initialised from another merge) is
trained for ``steps`` steps: for training pairs of every category, its noise prediction on the noised
unsafe image under the unsafe prompt is pulled towards that category's expert's (the teacher: base +
that expert's LoRA), and on the safe twins (under their captions and the empty caption, the
unconditional branch of classifier-free guidance) towards the base model's. The experts are used as they are;
no preference data is re-rendered.
"""

from __future__ import annotations

import tempfile

import numpy as np
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


def _encode(pipe, images: np.ndarray, prompts: list[str], generator: torch.Generator):
    """Noised latents (VAE posterior mode, a random timestep each), timesteps and text states."""
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ids = np.array([f"distill {i}" for i in range(len(images))])
    device, dtype = pipe.unet.device, pipe.unet.dtype
    with torch.no_grad():
        x = torch.from_numpy(pixels(images, resolution, ids)).to(device, dtype)
        latents = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
        states = pipe.encode_prompt(prompts, device, 1, False)[0]
    # Drawn on the CPU generator, so a run is the same on any device.
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    return pipe.scheduler.add_noise(latents, noise, t.to(device)), t.to(device), states


def distill(config: Config, experts: list[str], init: MergedLora, *, steps: int, lr: float = 1e-3,
            batch_size: int = 16, seed: int = 0) -> MergedLora:
    """``init`` trained ``steps`` steps towards the experts (on their categories) and the base (on benign)."""
    pipe = load_pipeline(config.model)
    unet = pipe.unet
    with tempfile.TemporaryDirectory() as tmp:
        pipe.load_lora_weights(save_merged(init, tmp), adapter_name=STUDENT)
    for name in experts:
        pipe.load_lora_weights(layout.lora_file(expert_dir(config.run_root, name)), adapter_name=expert_slug(name))
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if f".{STUDENT}." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    columns = ["category", "split", "unsafe_prompt", "unsafe_image", "safe_prompt", "safe_image"]
    rows = read_pairs_pandas(pairs_location(config), columns=columns, filters=[("split", "=", "train")])
    rows = rows[rows["category"].isin(experts)].reset_index(drop=True)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = rows.iloc[rng.choice(len(rows), min(batch_size, len(rows)), replace=False)]
        unsafe = _encode(pipe, batch["unsafe_image"].to_numpy(), batch["unsafe_prompt"].tolist(), generator)
        # Benign: the safe twins under their captions and under the empty caption (CFG's unconditional branch).
        benign = _encode(pipe, np.concatenate([batch["safe_image"].to_numpy()] * 2),
                         batch["safe_prompt"].tolist() + [""] * len(batch), generator)
        with torch.no_grad():
            teacher = torch.empty_like(unsafe[0])
            for name, index in batch.reset_index(drop=True).groupby("category").groups.items():
                pipe.set_adapters(expert_slug(name))
                teacher[index] = unet(unsafe[0][index], unsafe[1][index], encoder_hidden_states=unsafe[2][index]).sample
            pipe.disable_lora()
            base = unet(*benign[:2], encoder_hidden_states=benign[2]).sample
            pipe.enable_lora()
        pipe.set_adapters(STUDENT)
        student = unet(torch.cat([unsafe[0], benign[0]]), torch.cat([unsafe[1], benign[1]]),
                       encoder_hidden_states=torch.cat([unsafe[2], benign[2]])).sample
        loss = per_sample_mse(student, torch.cat([teacher, base])).mean()
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


