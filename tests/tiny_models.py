"""Tiny random models of the real classes, built from config and saved with ``save_pretrained``: what the
tests load where a run would download a hub model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from safetydpo.toyworld.models import MODEL_DIR


def save_tiny_clip(folder: Path, *, seed: int, max_positions: int) -> Path:
    """A random CLIPModel (16-d projection, 32 px images) with its processor and the toy tokenizer: the
    backbone of Q16 and the CLIP score. ``max_positions``: the text encoder's position embeddings."""
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": max_positions,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
