"""What ``GET /v1/models`` says of a model: the LoRA behind it and what its evaluation measured.

Model ids resolve in :mod:`safetydpo.model_ids` (the same resolver evaluation uses, so a model's card
shows the metrics of exactly the files it serves). Everything is looked up when asked, so experts
trained after the deployment started are listed.
"""

from __future__ import annotations

import logging

from safetydpo import layout, storage
from safetydpo.evaluation.metrics import finite_numbers
from safetydpo.model_ids import BASE, ModelCatalog, ModelIdError, ModelUnavailable

logger = logging.getLogger(__name__)


def lora_source(catalog: ModelCatalog, model_id: str) -> str | None:
    """LoRA file or MLflow URI behind ``model_id`` (None: the base model); :class:`ModelUnavailable` if none."""
    return None if model_id == BASE else catalog.resolve(model_id).lora


def card_of(catalog: ModelCatalog, benchmarks: tuple[str, ...], model_id: str) -> tuple[str | None, dict | None]:
    """The LoRA source of ``model_id`` and its evaluation figures, from one resolution (the registry is asked
    at most once per model and listing)."""
    try:
        ref = catalog.resolve(model_id)
    except (ModelIdError, ModelUnavailable):
        return None, None
    return ref.lora, eval_metrics(catalog.run_root, benchmarks, ref.name)


def eval_metrics(run_root: str, benchmarks: tuple[str, ...], name: str) -> dict[str, float] | None:
    """Finite numbers of ``eval/<name>/<benchmark>/metrics.json``, first configured benchmark found; None when
    the model was not evaluated."""
    for benchmark in benchmarks:
        path = storage.join(layout.eval_dir(run_root, name, benchmark), layout.METRICS_JSON)
        if storage.exists(path):
            try:
                return finite_numbers(storage.read_json(path))
            except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, not a mapping
                logger.warning("ignoring %s: %s", path, err)
    return None
