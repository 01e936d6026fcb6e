"""Export a merge as a whole pipeline: the LoRA fused into the UNet's weights, saved with ``save_pretrained``.

For tools that load a plain diffusers folder and cannot apply LoRAs (or to skip the adapter's per-step cost
when serving one fixed model). The folder is ``<merge>/pipeline/``; ``model_index.json`` is written last.
"""

from __future__ import annotations

import tempfile

import torch

from safetydpo import layout, storage
from safetydpo.config import ModelConfig
from safetydpo.pipelines import load_pipeline

FUSED_ADAPTER = "merged"


def save_fused_pipeline(model: ModelConfig, merge_folder: str) -> str:
    """Fuse ``merge_folder``'s LoRA into ``model``'s pipeline and save it to ``<merge_folder>/pipeline``; the path."""
    pipe = load_pipeline(model, device=torch.device("cpu"))
    pipe.load_lora_weights(layout.lora_file(merge_folder), adapter_name=FUSED_ADAPTER)
    pipe.fuse_lora(adapter_names=[FUSED_ADAPTER], lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    target = storage.join(merge_folder, layout.FUSED_PIPELINE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        storage.write_tree(tmp, target, last="model_index.json")
    return target
