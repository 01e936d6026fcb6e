"""The Ray Train worker of one expert, as a recipe in named phases.

:func:`~safetydpo.experts.entry.train_loop`, the ``TorchTrainer``'s train function, runs
:class:`ExpertRecipe`: it sets up the pipeline, LoRA, optimiser and data (``setup``), takes up the latest
checkpoint if Ray Train hands one (``restore``), then steps (``step``), checkpointing every
``experts.checkpoint_every`` steps (``checkpoint``) and logging the LoRA and a before/after grid at the
end (``log_final``).
Every (rank, step, micro-batch) draws its noise and timesteps from its own seed, and each epoch's
row order from (rank, epoch), so a resumed run redraws what an uninterrupted one would have. A
non-finite loss or gradient stops the expert with a message naming step and category; the last good
checkpoint stays.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray.train
import ray.train.torch
import torch
from diffusers.optimization import get_scheduler
from mlflow.entities import Metric

from safetydpo import tracking
from safetydpo.config import Config, DPOConfig
from safetydpo.dpo import SATURATED_LOGIT, adapters_disabled, dpo_step, unit_logit_beta
from safetydpo.experts.batches import LatentCache, step_inputs
from safetydpo.experts.entry import BENIGN, TRAIN
from safetydpo.experts.spec import ExpertError, ExpertSpec
from safetydpo.lora import add_lora, load_lora_state, lora_state, save_lora
from safetydpo.pipelines import load_pipeline
from safetydpo.plots import image_grid
from safetydpo.rendering import render

STATE_FILE = "state.pt"
LOG_EVERY = 10  # steps buffered per MLflow write: concurrent experts share one store
CALIBRATION_STEPS = 10  # the first steps over which the DPO logit's scale is judged (check_beta)
SATURATED_WARNING = 0.5  # warn when more than this share of pairs is saturated over those steps
_WEIGHT_DTYPE = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _NonFinite(Exception):
    """A loss or gradient norm that is inf or NaN; the step is not applied."""


def step_seed(*parts: int) -> int:
    """A seed for one (rank, step, micro-batch): a resumed run redraws the same noise and timesteps."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def optimizer_for(params: list[torch.nn.Parameter], dpo: DPOConfig, workers: int = 1) -> torch.optim.Optimizer:
    lr = dpo.effective_learning_rate(workers)
    if dpo.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=dpo.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=dpo.weight_decay)


def _micro_batches(dpo: DPOConfig, rank: int, start_step: int, name: str) -> Iterator[dict[str, np.ndarray]]:
    """Batches of this worker's shard of dataset ``name``, epoch after epoch, reshuffled each epoch.

    A run resumed at ``start_step`` passes over the micro-batches the finished steps consumed, so it
    continues at the same rows as an uninterrupted run (exact with one worker; with several, Ray Data's
    split decides which rows reach which worker). Passing over costs reading, not computing.
    """
    shard = ray.train.get_dataset_shard(name)

    def epochs() -> Iterator[dict[str, np.ndarray]]:
        for epoch in itertools.count():
            count = 0
            for batch in shard.iter_batches(batch_size=dpo.batch_size, batch_format="numpy",
                                            local_shuffle_buffer_size=4 * dpo.batch_size,
                                            local_shuffle_seed=step_seed(dpo.seed, rank, epoch)):
                count += 1
                yield batch
            if count == 0:
                raise ExpertError(f"worker {rank} received no rows of the {name!r} dataset")

    return itertools.islice(epochs(), start_step * dpo.gradient_accumulation_steps, None)


def _global_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(values)
        values = values / world
    return values


class _MetricLog:
    """Per-step metrics for the rank-0 MLflow run, written in batches."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.pending: list[Metric] = []
        self.window: list[dict[str, float]] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.window.append(metrics)
        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in metrics.items()]
        if step % LOG_EVERY == 0:
            self.flush()

    def flush(self) -> None:
        if self.run_id and self.pending:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=self.pending)
        self.pending = []

    def take_window(self) -> dict[str, float]:
        """Mean of every metric since the last call: what a checkpoint reports."""
        window, self.window = self.window, []
        return {k: float(np.mean([m[k] for m in window])) for k in window[0]} if window else {}


class ExpertRecipe:
    """One worker's share of training one expert; Ray Train runs one per worker."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        """Set-up: the pipeline with a fresh LoRA, the optimiser, the lr schedule and the loss scaler."""
        self.config: Config = loop_config["config"]
        self.spec: ExpertSpec = loop_config["spec"]
        self.fingerprint: str = loop_config["fingerprint"]
        self.dpo = self.config.experts.dpo_for(self.config.dpo, self.spec.name)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        weights = self.config.model.model_copy(update={"dtype": _WEIGHT_DTYPE[self.dpo.mixed_precision]})
        self.pipe = load_pipeline(weights, self.device)
        if self.pipe.unet.config.addition_embed_type is not None:
            raise ExpertError(f"{self.config.model.pretrained}: UNets with added conditioning (SDXL) not supported")
        self.unet = self.pipe.unet
        self.params = add_lora(self.unet, self.dpo)
        self.resolution = self.config.model.resolution or self.unet.config.sample_size * self.pipe.vae_scale_factor
        self.optimizer = optimizer_for(self.params, self.dpo, self.world)
        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer,
                                          num_warmup_steps=self.dpo.warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dpo.mixed_precision == "fp16")
        self.autocast = torch.autocast(self.device.type, dtype=_AUTOCAST.get(self.dpo.mixed_precision),
                                       enabled=self.dpo.mixed_precision != "no")
        self.step = self.resumed = 0
        self.last_metrics: dict[str, Any] = {}
        self.latents = LatentCache()

    def restore(self) -> bool:
        """Take up Ray Train's latest checkpoint, if any (a restarted worker or a re-run); True if one was."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
            load_lora_state(self.unet, state["lora"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.step = self.resumed = state["step"]
            self.last_metrics = state["metrics"]
        self.model = ray.train.torch.prepare_model(self.unet, move_to_device=False) if self.world > 1 else self.unet
        return bool(checkpoint)

    def train_step(self, batches: Iterator, benign_batches: Iterator | None) -> dict[str, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns its metrics."""
        dpo, accum = self.dpo, self.dpo.gradient_accumulation_steps
        sums = None
        for micro in range(accum):
            seed = step_seed(dpo.seed, self.rank, self.step, micro)
            generator = torch.Generator(self.device).manual_seed(seed)
            inputs = step_inputs(self.pipe, dpo, next(batches), next(benign_batches) if benign_batches else None,
                                 np.random.default_rng(seed), self.resolution, self.latents)
            sync = self.model.no_sync() if self.world > 1 and micro < accum - 1 else nullcontext()
            with sync:
                with self.autocast:
                    out = dpo_step(self.unet, self.pipe.scheduler, **inputs, beta=dpo.beta, sft_weight=dpo.sft_weight,
                                   anchor_weight=dpo.anchor_weight, preserve_weight=dpo.preserve_weight,
                                   generator=generator, model=self.model)
                names = list(out.metrics)
                values = _global_mean(torch.stack(list(out.metrics.values())), self.world)
                loss = values[names.index("loss")]
                if not torch.isfinite(loss):
                    raise _NonFinite(f"loss {loss.item()}")
                self.scaler.scale(out.loss / accum).backward()
            sums = values if sums is None else sums + values
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, dpo.max_grad_norm)
        if not (self.scaler.is_enabled() or torch.isfinite(grad_norm)):
            raise _NonFinite(f"gradient norm {grad_norm.item()}")
        lr = self.lr_scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dict(zip(names, (sums / accum).tolist(), strict=True)) | {"lr": lr, "grad_norm": grad_norm.item()}

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Checkpoint the current (finite) state; every rank calls this, rank 0 writes the files."""
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if self.rank == 0:
                torch.save({"step": self.step, "lora": lora_state(self.unet), "optimizer": self.optimizer.state_dict(),
                            "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                            "metrics": metrics}, Path(folder) / STATE_FILE)
                save_lora(self.unet, folder)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": self.step, **metrics}, checkpoint=saved)

    def check_beta(self, early: list[dict[str, float]]) -> None:
        """Log ``beta_unit_logit`` (:func:`~safetydpo.dpo.unit_logit_beta` of the first steps' mean |margin|)
        and the share of saturated pairs; warn, in the job log and as a run tag, when most pairs saturate."""
        saturated = float(np.mean([m["saturated"] for m in early]))
        suggested = unit_logit_beta(float(np.mean([m["margin_abs"] for m in early])))
        mlflow.log_metrics({"beta_unit_logit": suggested, "early_saturated": saturated}, step=self.step)
        if saturated > SATURATED_WARNING:
            message = (f"expert {self.spec.name}: dpo.beta={self.dpo.beta:g} saturates the DPO logit in the first "
                       f"{len(early)} steps ({saturated:.0%} of pairs beyond |logit| {SATURATED_LOGIT}), so few pairs "
                       f"still teach; dpo.beta~{suggested:.3g} puts the mean |logit| at 1 for this model and lr")
            print(f"warning: {message}", file=sys.__stdout__, flush=True)
            mlflow.set_tag("safetydpo.beta_warning", message)

    def log_final(self) -> None:
        """Log the LoRA and a before (LoRA off) / after grid of the expert's unsafe prompts to MLflow."""
        spec, generation = self.spec, self.config.generation
        self.unet.eval()
        kwargs = {"num_inference_steps": generation.num_inference_steps,
                  "guidance_scale": generation.guidance_scale, "negative_prompt": generation.negative_prompt}
        with torch.no_grad(), self.autocast:
            with adapters_disabled(self.unet):
                before = render(self.pipe, spec.preview_prompts, spec.preview_seeds, **kwargs)
            after = render(self.pipe, spec.preview_prompts, spec.preview_seeds, **kwargs)
        self.unet.train()
        grid = image_grid([list(before), list(after)], row_labels=["base", spec.slug])
        tracking.log_image(grid, f"samples/{spec.slug}_before_after.png")
        rows = zip(spec.preview_seeds, spec.preview_prompts, strict=True)
        mlflow.log_text("\n".join(f"{s}\t{p}" for s, p in rows), f"samples/{spec.slug}_prompts.tsv")
        with tempfile.TemporaryDirectory() as folder:
            tracking.log_artifact(save_lora(self.unet, folder), "lora")

    def _open_run(self, stack: ExitStack, resumed: bool) -> str | None:
        """Rank 0's MLflow child run of the expert (params on a fresh start); its id, None on other ranks."""
        if self.rank != 0:
            return None
        tags = {"safetydpo.expert": self.spec.name, "safetydpo.host": socket.gethostname(),
                "safetydpo.pid": str(os.getpid())}  # which process trains it now
        run = stack.enter_context(tracking.child_run(f"expert/{self.spec.slug}", tags=tags))
        if resumed:
            mlflow.log_metric("resumed_from_step", self.resumed, step=self.resumed)
        else:
            spec = self.spec
            tracking.log_params({**{f"dpo.{k}": v for k, v in self.dpo.model_dump().items()},
                                 "expert": spec.name, "categories": ",".join(spec.categories),
                                 "num_pairs": spec.num_pairs, "data_hash": spec.data_hash,
                                 "fingerprint": self.fingerprint, "num_workers": self.world})
        return run.info.run_id

    def run(self) -> None:
        """Restore, step to ``max_steps`` with checkpoints, log the result; stop cleanly on a non-finite step."""
        resumed = self.restore()
        dpo = self.dpo
        with ExitStack() as stack:
            log = _MetricLog(self._open_run(stack, resumed))
            batches = _micro_batches(dpo, self.rank, self.step, TRAIN)
            benign_batches = _micro_batches(dpo, self.rank, self.step, BENIGN) if dpo.preserve_weight else None
            started = time.perf_counter()
            early: list[dict[str, float]] = []
            try:
                while self.step < dpo.max_steps:
                    metrics = self.train_step(batches, benign_batches)
                    log.add(self.step, metrics)
                    if self.resumed == 0 and self.step <= CALIBRATION_STEPS:
                        early.append(metrics)
                        if self.step == min(CALIBRATION_STEPS, dpo.max_steps) and self.rank == 0:
                            self.check_beta(early)
                    if self.step % self.config.experts.checkpoint_every == 0 or self.step == dpo.max_steps:
                        log.flush()
                        if self.step == dpo.max_steps and self.rank == 0:
                            self.log_final()
                        window = log.take_window()
                        if self.rank == 0:  # the job log's progress line, one per checkpoint
                            loss, seconds = window.get("loss", float("nan")), time.perf_counter() - started
                            # Ray Train's print logs and, when stdout is wrapped, tees too: the real stdout once.
                            print(f"expert {self.spec.name}: step {self.step}/{dpo.max_steps}, loss {loss:.4g}, "
                                  f"{seconds:.0f} s", file=sys.__stdout__, flush=True)
                        self.checkpoint(window)
            except _NonFinite as err:
                message = (f"expert {self.spec.name!r} (categories {list(self.spec.categories)}): non-finite {err} "
                           f"at step {self.step + 1}; stopped there, the last good checkpoint (step {self.step}) "
                           "is kept")
                log.flush()
                if self.rank == 0:
                    mlflow.set_tag("safetydpo.error", message)
                self.checkpoint({"error": message})
                return
            if self.resumed == dpo.max_steps:  # restarted after the final checkpoint: report it again
                self.checkpoint(self.last_metrics)

