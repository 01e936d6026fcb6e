"""Safety experts: one Diffusion-DPO LoRA per harmful category, trained side by side on Ray.

Split the way Ray's training templates split a job:

- :mod:`~safetydpo.experts.spec`: what an expert is (name, folder, fingerprint, finished or not),
- :mod:`~safetydpo.experts.data`: the pairs checked once and read per expert with Ray Data,
- :mod:`~safetydpo.experts.batches`: a batch of pairs -> the tensors of one DPO step,
- :mod:`~safetydpo.experts.worker`: the Ray Train worker, a recipe in named phases
  (entered through the light :mod:`~safetydpo.experts.entry`),
- :mod:`~safetydpo.experts.driver`: one ``TorchTrainer`` per expert, several at once as Ray Tune trials.

Under the run root::

    experts/<slug>/pytorch_lora_weights.safetensors   diffusers LoRA format (pipe.load_lora_weights)
    experts/<slug>/expert.json                        written last: config, data hash, steps, metrics
    experts/_ray/<slug>-<fingerprint>/                Ray Train checkpoints (RunConfig.storage_path)
    experts/_ray/tune-<time>/                         the Ray Tune run that drove the trainers

A trainer restarted by its ``FailureConfig`` resumes from its latest checkpoint; so does a re-run,
because the Ray Train run is named after the expert's fingerprint (model, dpo settings, workers,
data hash). A re-run skips experts whose ``expert.json`` carries the current fingerprint.
A non-finite loss or gradient stops only that expert, with an error naming step and category;
its last good checkpoint stays, the other experts finish, and :func:`train_experts` raises last.
"""

from typing import Any

from safetydpo.experts.spec import ALL, ExpertError, ExpertSpec, expert_dir, expert_names, lora_paths

__all__ = ["ALL", "ExpertError", "ExpertSpec", "describe", "expert_dir", "expert_names", "lora_paths",
           "train_experts"]


def __getattr__(name: str) -> Any:
    """The driver's functions on first use: Ray's helper processes import this package to unpickle the train
    function and Ray Data's functions, and should not pay for the driver's imports (Ray Train, Tune, MLflow)."""
    if name in ("describe", "train_experts"):
        from safetydpo.experts import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
