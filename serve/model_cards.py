"""What ``GET /v1/models`` says of a model: the LoRA behind it and what its evaluation measured.

Model ids resolve in :mod:`safetydpo.model_ids` (the same resolver evaluation uses, so a model's card
shows the metrics of exactly the files it serves). Everything is looked up when asked, so experts
trained after the deployment started are listed.
"""

from __future__ import annotations

import logging
import math

from safetydpo import layout, storage
from safetydpo.model_ids import BASE, ModelCatalog, ModelIdError, ModelUnavailable

logger = logging.getLogger(__name__)


def lora_source(catalog: ModelCatalog, model_id: str) -> str | None:
    """LoRA file or MLflow URI behind ``model_id`` (None: the base model); :class:`ModelUnavailable` if none."""
    return None if model_id == BASE else catalog.resolve(model_id).lora


def eval_metrics(catalog: ModelCatalog, benchmarks: tuple[str, ...], model_id: str) -> dict[str, float] | None:
    """Finite numbers of the model's ``eval/<name>/<benchmark>/metrics.json``, first configured benchmark
    found; None when it was not evaluated (or has no LoRA yet)."""
    try:
        name = catalog.resolve(model_id).name
    except (ModelIdError, ModelUnavailable):
        return None
    for benchmark in benchmarks:
        path = storage.join(layout.eval_dir(catalog.run_root, name, benchmark), layout.METRICS_JSON)
        if storage.exists(path):
            try:
                raw = storage.read_json(path)
                return {k: float(v) for k, v in raw.items()
                        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
            except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, not a mapping
                logger.warning("ignoring %s: %s", path, err)
    return None
