"""The run root's layout: every folder and file name a stage writes under ``run_root``, defined once.

::

    pairs/<fingerprint>/                      the rendered preference pairs (Parquet shards + manifest.json)
    experts/<expert>/pytorch_lora_weights.safetensors + expert.json
    experts/_ray/                             Ray Train / Tune state of the experts stage
    merged/<method>/pytorch_lora_weights.safetensors + merge.json
    merged/<method>/pipeline/                 with merge.export_pipeline: the LoRA fused into a full pipeline
    merged/search/                            the merge search's trials
    eval/<model>/<benchmark>/                 images, scores, metrics.json, report

Stages, the evaluation's model ids and Serve build every path with these helpers, so a folder is
renamed in one place. Paths are local folders or storage URIs (see :mod:`safetydpo.storage`).
"""

from __future__ import annotations

from safetydpo import storage

PAIRS_DIR = "pairs"
EXPERTS_DIR = "experts"
MERGED_DIR = "merged"
EVAL_DIR = "eval"
RAY_DIR = "_ray"  # Ray Train / Tune run state inside a stage's folder
SEARCH_DIR = "search"  # the merge search's trials, inside merged/
FUSED_PIPELINE_DIR = "pipeline"  # a merge fused into the UNet, saved as a whole diffusers pipeline

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
EXPERT_JSON = "expert.json"  # written last: an expert is finished iff it exists
MERGE_JSON = "merge.json"
METRICS_JSON = "metrics.json"
INTERVALS_JSON = "intervals.json"  # beside metrics.json: each metric's 95% interval and image count


def pairs_dir(run_root: str, fingerprint: str | None = None) -> str:
    """``pairs/`` or one dataset ``pairs/<fingerprint>``."""
    return storage.join(run_root, PAIRS_DIR, *([fingerprint] if fingerprint else []))


def experts_dir(run_root: str) -> str:
    return storage.join(run_root, EXPERTS_DIR)


def expert_dir(run_root: str, slug: str) -> str:
    """``experts/<slug>``: ``slug`` is an expert's folder name (``illegal_activity``, ``all``)."""
    return storage.join(run_root, EXPERTS_DIR, slug)


def merged_dir(run_root: str, method: str | None = None) -> str:
    """``merged/`` or one merge ``merged/<method>``."""
    return storage.join(run_root, MERGED_DIR, *([method] if method else []))


def eval_dir(run_root: str, model: str, benchmark: str) -> str:
    """``eval/<model>/<benchmark>``: ``model`` is the evaluated model's folder name."""
    return storage.join(run_root, EVAL_DIR, model, benchmark)


def lora_file(folder: str) -> str:
    """The LoRA weights file of a folder; a path that already names a ``.safetensors`` file is kept."""
    return folder if folder.endswith(".safetensors") else storage.join(folder, LORA_WEIGHTS)
