"""LoRA files in the diffusers format, as per-layer factors: read experts, write merged adapters.

An expert is what :func:`safetydpo.lora.save_lora` writes: ``<folder>/pytorch_lora_weights.safetensors``
with tensors ``unet.<module>.lora.down.weight`` (A, r x in) and ``unet.<module>.lora.up.weight``
(B, out x r), and peft's ``LoraConfig`` as JSON in the safetensors header under
``lora_adapter_metadata``, every key prefixed ``unet.`` (``unet.r``, ``unet.lora_alpha``...). The layer's
weight change is ``delta = scale * B @ A`` with peft's ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). A layer's key is the tensor name without the ``.lora...weight`` suffix: ``unet.<module>``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from peft.utils.other import get_pattern_key

from safetydpo import layout, storage

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
MERGE_METADATA_KEY = "safetydpo_merge"  # our provenance (method, experts, weights); diffusers ignores it
_TENSOR_KEY = re.compile(r"^(?P<layer>.+)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_DOWN = ("lora.down", "lora_A")


class MergeError(ValueError):
    """Experts cannot be merged (unreadable file, different layers, ranks, shapes or base models)."""


@dataclass(frozen=True)
class LoraFactors:
    """One layer's adapter: ``delta = scale * B @ A`` (A: r x in, B: out x r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense weight change (out x in), fp32."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class ExpertLora:
    """A trained expert: its name (category), factors by layer key, and the base model it was trained on."""

    name: str
    layers: dict[str, LoraFactors]
    base_model: str | None = None  # None: unknown, not checked


@dataclass(frozen=True)
class MergedLora:
    """A merged adapter (every scale 1) and, per layer, ``||dW - B A||_F / ||dW||_F`` of its export."""

    layers: dict[str, LoraFactors]
    errors: dict[str, float] = field(default_factory=dict)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: an 8-byte little-endian length, then a JSON header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def _adapter_config(metadata: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The ``LoraConfig`` fields stored for ``prefix`` (e.g. ``unet``), prefix removed; {} when absent."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    config = json.loads(raw) if raw else {}
    return {k.removeprefix(f"{prefix}."): v for k, v in config.items() if k.startswith(f"{prefix}.")}


def _scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """peft's scaling for ``module``; without metadata diffusers loads with alpha = r, i.e. scale 1."""
    if not config:
        return 1.0
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not plain low-rank deltas")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected = ranks.get(get_pattern_key(ranks, module), config["r"])
    if expected != rank:
        raise ValueError(f"{module}: rank {rank} in the tensors but {expected} in the metadata")
    alpha = alphas.get(get_pattern_key(alphas, module), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _parse(data: bytes, name: str, base_model: str | None) -> ExpertLora:
    tensors = safetensors.torch.load(data)
    metadata = _header_metadata(data)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r}")
        parts.setdefault(match["layer"], {})["A" if match["part"] in _DOWN else "B"] = tensor.float()
    layers = {}
    for layer, ab in parts.items():
        if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].shape[1:] != ab["A"].shape[:1]:
            raise ValueError(f"{layer}: incomplete or inconsistent factors {[tuple(t.shape) for t in ab.values()]}")
        prefix, module = layer.split(".", 1)
        config = _adapter_config(metadata, prefix)
        layers[layer] = LoraFactors(ab["A"], ab["B"], _scale(config, module, ab["A"].shape[0]))
    if not layers:
        raise ValueError("no LoRA tensors")
    config = _adapter_config(metadata, next(iter(layers)).split(".", 1)[0])
    return ExpertLora(name, layers, base_model or config.get("base_model_name_or_path"))


def load_expert(name: str, location: str, base_model: str | None = None) -> ExpertLora:
    """Read expert ``name`` from a folder holding ``pytorch_lora_weights.safetensors`` (or the file itself).

    ``base_model`` (e.g. the model fingerprint) is checked for equality across merged experts; when None
    the file's ``base_model_name_or_path`` is used, if any. Any unreadable file raises :class:`MergeError`.
    """
    path = layout.lora_file(location)
    try:
        return _parse(storage.read_bytes(path), name, base_model)
    except Exception as error:  # missing, truncated, not safetensors, bad metadata: all the expert's fault
        raise MergeError(f"expert {name!r}: cannot read LoRA file {path}: {error}") from error


def _padded(factors: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale folded into B and zero components appended up to ``rank``: the same delta, uniform rank."""
    extra = rank - factors.rank
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])])
    B = torch.cat([factors.scale * factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1)
    return A.contiguous(), B.contiguous()


def save_merged(merged: MergedLora, directory: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``merged`` as ``<directory>/pytorch_lora_weights.safetensors`` (atomically) and return its path.

    Every layer is padded to the largest rank r and stored with ``lora_alpha = r`` (scale 1), so
    ``pipe.load_lora_weights(directory)`` applies exactly ``B @ A``. ``metadata`` (provenance) is stored as
    JSON under ``safetydpo_merge`` in the file's header.
    """
    rank = max(f.rank for f in merged.layers.values())
    tensors, targets = {}, {}
    for layer, factors in merged.layers.items():
        tensors[f"{layer}.lora.down.weight"], tensors[f"{layer}.lora.up.weight"] = _padded(factors, rank)
        prefix, module = layer.split(".", 1)
        targets.setdefault(prefix, []).append(module)
    adapter = {}
    for prefix, modules in targets.items():
        adapter |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": rank, f"{prefix}.target_modules": sorted(modules)}
    header = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}
    if metadata is not None:
        header[MERGE_METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    target = layout.lora_file(directory)
    storage.write_bytes(target, safetensors.torch.save(tensors, metadata=header))
    return target
