"""Loading the text-to-image pipeline every stage works on, from a :class:`ModelConfig`.

``pretrained: toy`` is the shipped toy world; anything else is a diffusers folder or hub
id (SD 1.5 / 2.1 / XL). Precision follows ``dtype``: ``auto`` is fp16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from safetydpo import storage
from safetydpo.config import TOY_MODEL, ModelConfig

_HASHED_BYTES = 64 * 2**20  # files up to this size are identified by content, larger ones by size + mtime
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def model_path(config: ModelConfig) -> str:
    """Folder or hub id that ``from_pretrained`` reads."""
    if config.pretrained == TOY_MODEL:
        from safetydpo.toyworld.models import MODEL_DIR

        return str(MODEL_DIR)
    return config.pretrained


def model_fingerprint(config: ModelConfig) -> str:
    """Identity of the weights ``config`` loads, to key outputs to them (new weights, new key).

    A local folder (the toy model included): every file's name, size and content hash, except
    that files over 64 MiB go by size and mtime so multi-GB checkpoints are not read. A hub id:
    the id, revision and variant (an unpinned revision follows ``main``).
    """
    folder = Path(model_path(config))
    if not folder.is_dir():
        return storage.fingerprint(config.pretrained, config.revision, config.variant)
    entries = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        stat = file.stat()
        ident = (hashlib.sha256(file.read_bytes()).hexdigest() if stat.st_size <= _HASHED_BYTES
                 else stat.st_mtime_ns)
        entries.append((relative.as_posix(), stat.st_size, ident))
    return storage.fingerprint(entries, config.variant)


class _UnetOnlyLoraNotice(logging.Filter):
    """Drops diffusers' warning that a LoRA has no text-encoder weights: this project's LoRAs are UNet-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to CLIPTextModel" not in record.getMessage()


def _quiet_model_loading() -> None:
    """No per-file progress bars from diffusers and transformers: every Ray worker loads the pipeline, and
    their bars would bury the job log's own progress lines."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    if not any(isinstance(f, _UnetOnlyLoraNotice) for f in lora_log.filters):
        lora_log.addFilter(_UnetOnlyLoraNotice())


def load_pipeline(config: ModelConfig, device: torch.device | None = None) -> DiffusionPipeline:
    """The configured pipeline on ``device`` with the safety checker off (we measure safety ourselves)."""
    _quiet_model_loading()
    device = device or default_device()
    dtype = resolve_dtype(config.dtype, device)
    kwargs = {"dtype": dtype, "revision": config.revision, "variant": config.variant}
    if "xl" not in config.pretrained.lower():
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(model_path(config), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 HxWx3 -> PNG bytes: the form images take between stages (Ray Data accounts bytes, not PIL)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
