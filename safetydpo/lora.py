"""LoRA adapters on the UNet with peft, saved in the diffusers format ``pipe.load_lora_weights`` reads.

Only the UNet's attention projections get adapters (the paper's setup); the text encoder and VAE
stay frozen. ``init_lora_weights="gaussian"`` draws A from a Gaussian and sets B to zero, so a fresh
adapter changes nothing and the DPO loss starts at exactly log 2.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from safetydpo import layout, storage
from safetydpo.config import DPOConfig

ADAPTER = "default"  # peft's name for the adapter add_adapter creates


def add_lora(unet: UNet2DConditionModel, dpo: DPOConfig) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add the configured LoRA (alpha defaults to rank) and return its trainable parameters.

    LoRA parameters are kept in fp32 even when the UNet is fp16/bf16, so optimiser updates are exact.
    A's Gaussian draw comes from ``dpo.seed`` (peft draws it on the CPU), so two runs of one config start
    from the same adapter; the process's own random state is left as it was.
    """
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dpo.seed)
        unet.add_adapter(LoraConfig(
            r=dpo.lora_rank, lora_alpha=dpo.lora_alpha or dpo.lora_rank,
            init_lora_weights="gaussian", target_modules=list(dpo.lora_targets),
        ))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (what a checkpoint stores), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Put checkpointed adapter weights back into a UNet prepared with :func:`add_lora`."""
    result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise ValueError(f"LoRA checkpoint has keys the UNet's adapter lacks: {result.unexpected_keys[:5]}")


def save_lora(unet: UNet2DConditionModel, directory: str,
              pipeline_cls: type = StableDiffusionPipeline) -> str:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` in diffusers format, atomically.

    Rank and alpha travel in the file's metadata, so loading restores the same scaling. Returns the path.
    """
    target = layout.lora_file(directory)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_cls.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(lora_state(unet)),
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(), safe_serialization=True,
        )
        storage.write_bytes(target, (Path(tmp) / layout.LORA_WEIGHTS).read_bytes())
    return target
