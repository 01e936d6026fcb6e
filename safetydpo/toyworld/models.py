"""Architectures of the toy pipeline: the same diffusers classes as Stable Diffusion, tiny.

32x32 RGB images, a 3-level VAE to 4x8x8 latents, a 2-layer CLIP text encoder and a
1M-parameter cross-attention UNet; DDIM with SD's noise schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from safetydpo.toyworld.world import IMAGE_SIZE

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"  # diffusers StableDiffusionPipeline folder
DETECTOR_DIR = WEIGHTS_DIR / "detector"
MAX_TOKENS = 16
TEXT_DIM = 64
LATENT_SIZE = IMAGE_SIZE // 4


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.x's schedule, so toy and SD share every sampling code path."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_toy_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The shipped toy model, loaded with ``from_pretrained`` like any SD checkpoint."""
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"toy model weights missing at {MODEL_DIR}; run python -m safetydpo.toyworld.pretrain")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
