"""Safety experts: one Diffusion-DPO LoRA per harmful category, trained side by side on Ray.

Each expert is one Ray Train ``TorchTrainer`` (data parallel over ``experts.num_workers``) reading
its category's rows of the ``pairs/`` Parquet through Ray Data (and, when ``dpo.preserve_weight`` is
on, the safe twins of every category as a second dataset, ``benign``, read once for all experts).
Experts run as trials of one Ray Tune run, at most ``experts.max_concurrent`` at once: the trial
function is the trainer's driver, which is how Ray Train V2 runs several trainers side by side.
A trial reserves memory but no CPU (it only waits on its trainer); each trainer's workers reserve
``experts.cpus_per_worker`` each.
Ray Data reads the pairs with tasks of one whole CPU, so the concurrency is also bounded by the
cluster's CPUs: one CPU always stays free for the reads (:func:`concurrency`).

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

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
from diffusers.optimization import get_scheduler
from mlflow.entities import Metric
from ray import tune
from ray.data.expressions import col

from safetydpo import storage, tracking
from safetydpo.categories import CATEGORIES, category_slug, normalize_category
from safetydpo.config import Config, DPOConfig
from safetydpo.data.pairs import MANIFEST
from safetydpo.dpo import Benign, adapters_disabled, dpo_step
from safetydpo.lora import WEIGHTS_NAME, add_lora, load_lora_state, lora_state, save_lora
from safetydpo.pipelines import decode_png, load_pipeline
from safetydpo.plots import image_grid
from safetydpo.rendering import render

logger = logging.getLogger(__name__)

ALL = "all"  # the expert trained on the pairs of every selected category (the paper's "All-single")
EXPERTS_DIR = "experts"
RAY_DIR = "_ray"
EXPERT_JSON = "expert.json"
STATE_FILE = "state.pt"
COLUMNS = ("pair_id", "category", "unsafe_prompt", "safe_prompt", "seed", "split",
           "unsafe_image", "safe_image")
TRAIN_SPLIT = "train"
BENIGN = "benign"  # the Ray Train dataset of the preservation term
PREVIEW_SPLIT = "validation"
PREVIEW_IMAGES = 4  # before/after columns in an expert's image grid
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}  # the trial's Python process; Tune refuses all-zero
DATA_CPUS = 1.0  # kept free for Ray Data's read tasks (one CPU each) while trainers run
LOG_EVERY = 10  # steps buffered per MLflow write: concurrent experts share one store
_WEIGHT_DTYPE = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_MAX_LISTED = 5


class ExpertError(RuntimeError):
    """Bad pairs data or a failed expert; the message names the file, row, expert or step."""


# -- names and paths ---------------------------------------------------------------------------

def expert_slug(name: str) -> str:
    """Folder and run name of an expert: ``Illegal Activity`` -> ``illegal_activity``, ``all`` -> ``all``."""
    return ALL if name == ALL else category_slug(name)


def expert_dir(run_root: str, name: str) -> str:
    return storage.join(run_root, EXPERTS_DIR, expert_slug(name))


def expert_categories(config: Config) -> list[str]:
    """``experts.categories``, else the categories the data selects."""
    if config.experts.categories is not None:
        return config.experts.selected_categories()
    return config.data.selected_categories()


def expert_names(config: Config) -> list[str]:
    """The experts ``config`` asks for: its categories, plus ``all`` when ``experts.include_all``."""
    return expert_categories(config) + ([ALL] if config.experts.include_all else [])


def lora_paths(config: Config) -> dict[str, str]:
    """The trained LoRA file of every configured expert that has finished (``expert.json`` present)."""
    paths = {}
    for name in expert_names(config):
        folder = expert_dir(config.run_root, name)
        if storage.exists(storage.join(folder, EXPERT_JSON)):
            paths[name] = storage.join(folder, WEIGHTS_NAME)
    return paths


# -- pairs data ---------------------------------------------------------------------------------

def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if storage.is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def pairs_files(pairs: str) -> list[str]:
    """The Parquet files of a finished pairs dataset (those its ``manifest.json`` lists), or the one
    Parquet file given, as ``pyarrow.fs`` paths."""
    fs, path = _filesystem(pairs)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and path.endswith(".parquet"):
        return [path]
    if info.type != pafs.FileType.Directory:
        raise ExpertError(f"pairs path {pairs} does not exist")
    manifest = storage.join(pairs, MANIFEST)
    if not storage.exists(manifest):
        raise ExpertError(f"{pairs} is not a finished pairs dataset (no {MANIFEST}): run jobs/generate.py")
    return [_filesystem(storage.join(pairs, name))[1] for name in storage.read_json(manifest)["files"]]


def default_pairs(config: Config) -> str:
    """The pairs dataset the generation stage renders for ``config``."""
    from safetydpo.generation import pairs_location

    return pairs_location(config)


@dataclass(frozen=True)
class ExpertSpec:
    """What one expert trains on, as read from the pairs data."""

    name: str  # a category or "all"
    categories: tuple[str, ...]
    file_values: tuple[str, ...]  # category spellings in the files that map to ``categories``
    num_pairs: int  # training pairs
    data_hash: str  # of every training pair's id, prompts and image bytes
    benign_hash: str = ""  # the same over every category's training pairs: the preservation term's data
    preview_prompts: tuple[str, ...] = ()  # unsafe prompts of the before/after grid
    preview_seeds: tuple[int, ...] = ()

    @property
    def slug(self) -> str:
        return expert_slug(self.name)


@dataclass
class _CategoryScan:
    values: set[str] = field(default_factory=set)
    pairs: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    preview: dict[str, list[tuple[str, int]]] = field(
        default_factory=lambda: {TRAIN_SPLIT: [], PREVIEW_SPLIT: []})


def _scan_file(fs: pafs.FileSystem, path: str, scans: dict[str, _CategoryScan], problems: list[str]) -> None:
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            problems.append(f"{path}: missing column(s) {missing}")
            return
        row = 0
        for batch in parquet.iter_batches(columns=list(COLUMNS), batch_size=256):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                row += 1
                where = f"{path} row {row} (pair_id {cols['pair_id'][i]!r})"
                try:
                    category = normalize_category(cols["category"][i])
                except ValueError as err:
                    problems.append(f"{where}: {err}")
                    continue
                split = cols["split"][i]
                if split not in (TRAIN_SPLIT, PREVIEW_SPLIT):
                    continue
                empty = [c for c in ("unsafe_image", "safe_image", "unsafe_prompt", "safe_prompt")
                         if not cols[c][i]]
                if empty:
                    problems.append(f"{where}: {', '.join(empty)} missing")
                    continue
                scan = scans[category]
                scan.values.add(cols["category"][i])
                scan.preview[split].append((cols["unsafe_prompt"][i], int(cols["seed"][i])))
                if split == TRAIN_SPLIT:
                    scan.pairs += 1
                    for c in ("pair_id", "unsafe_prompt", "safe_prompt"):
                        scan.digest.update(str(cols[c][i]).encode() + b"\0")
                    scan.digest.update(hashlib.sha256(cols["unsafe_image"][i]).digest())
                    scan.digest.update(hashlib.sha256(cols["safe_image"][i]).digest())


def scan_pairs(pairs: str, names: list[str], num_workers: int = 1,
               all_categories: tuple[str, ...] = CATEGORIES) -> dict[str, ExpertSpec]:
    """Check the pairs data and describe each expert of ``names`` (categories and/or ``all``, which
    trains on ``all_categories``).

    Raises :class:`ExpertError` naming file, row and pair for unreadable rows, missing images or
    prompts, unknown categories, and naming the category for one with no (or too few) training pairs.
    """
    fs, _ = _filesystem(pairs)
    scans = {c: _CategoryScan() for c in CATEGORIES}
    problems: list[str] = []
    for path in pairs_files(pairs):
        _scan_file(fs, path, scans, problems)
    benign_hash = storage.fingerprint([scan.digest.hexdigest() for scan in scans.values() if scan.pairs], length=16)
    specs = {}
    for name in names:
        categories = tuple(all_categories) if name == ALL else (normalize_category(name),)
        count = sum(scans[c].pairs for c in categories)
        empty = [c for c in categories if scans[c].pairs == 0]
        if empty:
            problems.append(f"expert {name!r}: no {TRAIN_SPLIT} pairs for {empty} in {pairs}")
        elif count < num_workers:
            problems.append(f"expert {name!r}: {count} {TRAIN_SPLIT} pairs cannot feed {num_workers} workers")
        per_category = max(1, PREVIEW_IMAGES // len(categories))
        preview = [p for c in categories
                   for p in (scans[c].preview[PREVIEW_SPLIT] or scans[c].preview[TRAIN_SPLIT])[:per_category]]
        specs[name] = ExpertSpec(
            name=name, categories=categories,
            file_values=tuple(sorted(v for c in categories for v in scans[c].values)),
            num_pairs=count,
            data_hash=storage.fingerprint([scans[c].digest.hexdigest() for c in categories], length=16),
            preview_prompts=tuple(p for p, _ in preview), preview_seeds=tuple(s for _, s in preview),
            benign_hash=benign_hash,
        )
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ExpertError(f"pairs data {pairs} cannot train the experts:\n  {listed}{more}")
    return specs


def pairs_dataset(files: list[str], spec: ExpertSpec, pairs: str) -> ray.data.Dataset:
    """The expert's training rows, read once into the object store (filter and columns pushed into the read).

    Training loops over these rows for many epochs; materialised, each epoch replays blocks from the
    object store instead of listing and reading the Parquet files again (which, for a category's few
    thousand pairs, cost more than the epoch's DPO steps). Workers reshuffle every epoch as they iterate.
    """
    rows = (col("split") == TRAIN_SPLIT) & col("category").is_in(list(spec.file_values))
    return _read(files, pairs, rows, ["pair_id", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image"])


def benign_dataset(files: list[str], pairs: str) -> ray.data.Dataset:
    """The safe twins of every category's training pairs (prompt and image): the preservation term's inputs."""
    return _read(files, pairs, col("split") == TRAIN_SPLIT, ["pair_id", "safe_prompt", "safe_image"])


def _read(files: list[str], pairs: str, rows, columns: list[str]) -> ray.data.Dataset:
    fs, _ = _filesystem(pairs)
    dataset = ray.data.read_parquet(files, filesystem=fs).filter(expr=rows).select_columns(columns)
    return dataset.materialize().randomize_block_order()


# -- fingerprints and outputs ---------------------------------------------------------------------

def expert_fingerprint(config: Config, spec: ExpertSpec) -> str:
    """Hash of everything an expert's weights depend on (not resources, retries or checkpoint cadence)."""
    dpo = config.experts.dpo_for(config.dpo, spec.name)
    return storage.fingerprint(config.model.model_dump(mode="json"), dpo.model_dump(mode="json"),
                               config.experts.num_workers, spec.categories, spec.data_hash,
                               spec.benign_hash if dpo.preserve_weight else None)


def is_finished(config: Config, spec: ExpertSpec) -> bool:
    """Whether the expert's outputs exist and were trained with the current fingerprint."""
    folder = expert_dir(config.run_root, spec.name)
    meta_path = storage.join(folder, EXPERT_JSON)
    if not (storage.exists(meta_path) and storage.exists(storage.join(folder, WEIGHTS_NAME))):
        return False
    return storage.read_json(meta_path).get("fingerprint") == expert_fingerprint(config, spec)


# -- the training worker --------------------------------------------------------------------------

class _NonFinite(Exception):
    """A loss or gradient norm that is inf or NaN; the step is not applied."""


def _step_seed(*parts: int) -> int:
    """A seed for one (rank, step, micro-batch): a resumed run redraws the same noise and timesteps."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _optimizer(params: list[torch.nn.Parameter], dpo: DPOConfig) -> torch.optim.Optimizer:
    if dpo.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=dpo.learning_rate, weight_decay=dpo.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=dpo.learning_rate, weight_decay=dpo.weight_decay)


def _pixels(images: np.ndarray, resolution: int, pair_ids: np.ndarray) -> np.ndarray:
    """PNG bytes -> float32 (N, 3, H, W) in [-1, 1]."""
    decoded = np.stack([decode_png(b) for b in images])
    if decoded.shape[1:3] != (resolution, resolution):
        raise ExpertError(f"pair {pair_ids[0]!r}: images are {decoded.shape[1]}x{decoded.shape[2]}, "
                          f"the model trains at {resolution}x{resolution}")
    return decoded.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def _dpo_inputs(batch: dict[str, np.ndarray], dpo: DPOConfig, rng: np.random.Generator,
                resolution: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Winner (safe) and loser (unsafe) pixels, captions as ``dpo.pairing`` says, and each caption's anchor
    (the safe prompt of its pair). A dropped caption drops its anchor too: "" stays ""."""
    winners = _pixels(batch["safe_image"], resolution, batch["pair_id"])
    losers = _pixels(batch["unsafe_image"], resolution, batch["pair_id"])
    if dpo.random_flip:
        flip = rng.random(len(winners)) < 0.5  # one flip per pair: winner and loser stay aligned
        winners[flip], losers[flip] = winners[flip, ..., ::-1], losers[flip, ..., ::-1]
    unsafe, safe = batch["unsafe_prompt"].tolist(), batch["safe_prompt"].tolist()
    captions = {"unsafe": unsafe, "safe": safe, "both": unsafe + safe}[dpo.pairing]
    anchors = safe + safe if dpo.pairing == "both" else safe
    if dpo.pairing == "both":
        winners, losers = np.concatenate([winners, winners]), np.concatenate([losers, losers])
    drop = rng.random(len(captions)) < dpo.caption_dropout
    return (winners, losers, ["" if d else c for c, d in zip(captions, drop, strict=True)],
            ["" if d else a for a, d in zip(anchors, drop, strict=True)])


def step_inputs(pipe, dpo: DPOConfig, batch: dict[str, np.ndarray], benign: dict[str, np.ndarray] | None,
                 rng: np.random.Generator, resolution: int) -> dict[str, Any]:
    """:func:`~safetydpo.dpo.dpo_step`'s tensors for one micro-batch of pairs (and of benign rows when
    preservation is on): VAE latents and text states, each encoded in one call."""
    winners, losers, captions, anchors = _dpo_inputs(batch, dpo, rng, resolution)
    images = [winners, losers]
    texts = list(captions) + (anchors if dpo.anchor_weight else [])
    if benign is not None:
        images.append(_pixels(benign["safe_image"], resolution, benign["pair_id"]))
        texts += benign["safe_prompt"].tolist() + [""]
    unet, device = pipe.unet, pipe.unet.device
    with torch.no_grad():
        pixels = torch.from_numpy(np.concatenate(images)).to(device, pipe.vae.dtype)
        # The posterior's mode, not a sample: a VAE trained with a weak KL term (the toy world's) has a
        # posterior std as large as its latents, and a sample is noise to a UNet trained on modes; SD's
        # VAE posterior is narrow, so there the two differ little.
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        latents = (latents * pipe.vae.config.scaling_factor).to(unet.dtype)
        states = pipe.encode_prompt(texts, device, 1, False)[0]
    n = len(captions)
    inputs = {"winner": latents[:n], "loser": latents[n:2 * n], "encoder_hidden_states": states[:n]}
    if dpo.anchor_weight:
        inputs["anchor_states"] = states[n:2 * n]
    if benign is not None:  # texts end with the benign captions, then ""
        m = len(benign["safe_prompt"])
        inputs["benign"] = Benign(latents[2 * n:], states[-m - 1:-1], states[-1:])
    return inputs


def _micro_batches(dpo: DPOConfig, rank: int, start_step: int, name: str = "train") -> Iterator[dict[str, np.ndarray]]:
    """Batches of this worker's shard of dataset ``name``, epoch after epoch, reshuffled each epoch."""
    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_batches(batch_size=dpo.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * dpo.batch_size,
                                        local_shuffle_seed=_step_seed(dpo.seed, rank, start_step, epoch)):
            count += 1
            yield batch
        if count == 0:
            raise ExpertError(f"worker {rank} received no rows of the {name!r} dataset")
        epoch += 1


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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: DPO-train one expert's LoRA, checkpointing and resuming through Ray Train."""
    config: Config = loop_config["config"]
    spec: ExpertSpec = loop_config["spec"]
    os.environ.update(loop_config["env"])
    dpo = config.experts.dpo_for(config.dpo, spec.name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    weights = config.model.model_copy(update={"dtype": _WEIGHT_DTYPE[dpo.mixed_precision]})
    pipe = load_pipeline(weights, device)
    if pipe.unet.config.addition_embed_type is not None:
        raise ExpertError(f"{config.model.pretrained}: UNets with added conditioning (SDXL) not supported")
    unet = pipe.unet
    params = add_lora(unet, dpo)
    resolution = config.model.resolution or unet.config.sample_size * pipe.vae_scale_factor
    optimizer = _optimizer(params, dpo)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=dpo.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dpo.mixed_precision == "fp16")
    step = resumed = 0
    last_metrics: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        load_lora_state(unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = resumed = state["step"]
        last_metrics = state["metrics"]
    model = ray.train.torch.prepare_model(unet, move_to_device=False) if world > 1 else unet
    autocast = torch.autocast(device.type, dtype=_AUTOCAST.get(dpo.mixed_precision),
                              enabled=dpo.mixed_precision != "no")

    def report(metrics: dict[str, Any]) -> None:
        """Checkpoint the current (finite) state; every rank calls this, rank 0 writes the files."""
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save({"step": step, "lora": lora_state(unet), "optimizer": optimizer.state_dict(),
                            "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "metrics": metrics}, Path(folder) / STATE_FILE)
                save_lora(unet, folder)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": step, **metrics}, checkpoint=saved)

    with ExitStack() as stack:
        run = None
        if rank == 0:
            tags = {"safetydpo.expert": spec.name, "safetydpo.host": socket.gethostname(),
                    "safetydpo.pid": str(os.getpid())}  # which process trains it now
            run = stack.enter_context(tracking.child_run(f"expert/{spec.slug}", tags=tags))
            if checkpoint:
                mlflow.log_metric("resumed_from_step", resumed, step=resumed)
            else:
                tracking.log_params({**{f"dpo.{k}": v for k, v in dpo.model_dump().items()},
                                     "expert": spec.name, "categories": ",".join(spec.categories),
                                     "num_pairs": spec.num_pairs, "data_hash": spec.data_hash,
                                     "fingerprint": loop_config["fingerprint"], "num_workers": world})
        log = _MetricLog(run.info.run_id if run else None)
        accum = dpo.gradient_accumulation_steps
        batches = _micro_batches(dpo, rank, step)
        benign_batches = _micro_batches(dpo, rank, step, BENIGN) if dpo.preserve_weight else None
        try:
            while step < dpo.max_steps:
                sums = None
                for micro in range(accum):
                    seed = _step_seed(dpo.seed, rank, step, micro)
                    generator = torch.Generator(device).manual_seed(seed)
                    inputs = step_inputs(pipe, dpo, next(batches), next(benign_batches) if benign_batches else None,
                                          np.random.default_rng(seed), resolution)
                    sync = model.no_sync() if world > 1 and micro < accum - 1 else nullcontext()
                    with sync:
                        with autocast:
                            out = dpo_step(unet, pipe.scheduler, **inputs, beta=dpo.beta, sft_weight=dpo.sft_weight,
                                           anchor_weight=dpo.anchor_weight, preserve_weight=dpo.preserve_weight,
                                           generator=generator, model=model)
                        names = list(out.metrics)
                        values = _global_mean(torch.stack(list(out.metrics.values())), world)
                        loss = values[names.index("loss")]
                        if not torch.isfinite(loss):
                            raise _NonFinite(f"loss {loss.item()}")
                        scaler.scale(out.loss / accum).backward()
                    sums = values if sums is None else sums + values
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, dpo.max_grad_norm)
                if not (scaler.is_enabled() or torch.isfinite(grad_norm)):
                    raise _NonFinite(f"gradient norm {grad_norm.item()}")
                lr = lr_scheduler.get_last_lr()[0]
                scaler.step(optimizer)
                scaler.update()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                metrics = dict(zip(names, (sums / accum).tolist(), strict=True))
                log.add(step, {**metrics, "lr": lr, "grad_norm": grad_norm.item()})
                if step % config.experts.checkpoint_every == 0 or step == dpo.max_steps:
                    log.flush()
                    if step == dpo.max_steps and rank == 0:
                        _log_final(pipe, unet, spec, config, autocast)
                    report(log.take_window())
        except _NonFinite as err:
            message = (f"expert {spec.name!r} (categories {list(spec.categories)}): non-finite {err} at step "
                       f"{step + 1}; stopped there, the last good checkpoint (step {step}) is kept")
            log.flush()
            if rank == 0:
                mlflow.set_tag("safetydpo.error", message)
            report({"error": message})
            return
        if resumed == dpo.max_steps:  # restarted after the final checkpoint: report it again
            report(last_metrics)


def _log_final(pipe, unet, spec: ExpertSpec, config: Config, autocast) -> None:
    """Log the LoRA and a before (LoRA off) / after grid of the expert's unsafe prompts to MLflow."""
    unet.eval()
    kwargs = {"num_inference_steps": config.generation.num_inference_steps,
              "guidance_scale": config.generation.guidance_scale,
              "negative_prompt": config.generation.negative_prompt}
    with torch.no_grad(), autocast:
        with adapters_disabled(unet):
            before = render(pipe, spec.preview_prompts, spec.preview_seeds, **kwargs)
        after = render(pipe, spec.preview_prompts, spec.preview_seeds, **kwargs)
    unet.train()
    grid = image_grid([list(before), list(after)], row_labels=["base", spec.slug])
    tracking.log_image(grid, f"samples/{spec.slug}_before_after.png")
    rows = zip(spec.preview_seeds, spec.preview_prompts, strict=True)
    mlflow.log_text("\n".join(f"{s}\t{p}" for s, p in rows), f"samples/{spec.slug}_prompts.tsv")
    with tempfile.TemporaryDirectory() as folder:
        tracking.log_artifact(save_lora(unet, folder), "lora")


# -- one expert: the trainer's driver ---------------------------------------------------------------

def fit_expert(config: Config, spec: ExpertSpec, pairs: str, env: dict[str, str],
               benign: ray.data.Dataset | None = None) -> dict[str, Any]:
    """Train one expert with a ``TorchTrainer`` and publish its LoRA and ``expert.json``.

    ``benign`` is :func:`benign_dataset`, read once for all experts; read here when the expert's
    ``preserve_weight`` needs it and none is given. Returns the expert's record: ``status`` is
    ``trained`` or ``failed`` (non-finite loss, with the error).
    """
    start = time.perf_counter()
    files = pairs_files(pairs)
    datasets = {"train": pairs_dataset(files, spec, pairs)}
    if config.experts.dpo_for(config.dpo, spec.name).preserve_weight:
        datasets[BENIGN] = benign if benign is not None else benign_dataset(files, pairs)
    fp = expert_fingerprint(config, spec)
    resources = worker_resources(config)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "spec": spec, "env": env, "fingerprint": fp},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.experts.num_workers, use_gpu=config.experts.use_gpu,
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{spec.slug}-{fp}", storage_path=storage.join(config.run_root, EXPERTS_DIR, RAY_DIR),
            failure_config=ray.train.FailureConfig(max_failures=config.experts.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    record = {"name": spec.name, "fingerprint": fp, "checkpoint": result.checkpoint.path,
              "seconds": time.perf_counter() - start}
    if metrics.get("error"):
        return record | {"status": "failed", "error": metrics["error"], "steps": metrics["step"]}
    folder = expert_dir(config.run_root, spec.name)
    with result.checkpoint.as_directory() as ckpt:
        storage.write_bytes(storage.join(folder, WEIGHTS_NAME), (Path(ckpt) / WEIGHTS_NAME).read_bytes())
    dpo = config.experts.dpo_for(config.dpo, spec.name)
    meta = {
        "name": spec.name, "categories": list(spec.categories), "fingerprint": fp,
        "data_hash": spec.data_hash, "num_pairs": spec.num_pairs, "pairs": pairs,
        "steps": metrics["step"], "final_metrics": {k: v for k, v in metrics.items() if k != "step"},
        "checkpoint": result.checkpoint.path, "lora": storage.join(folder, WEIGHTS_NAME),
        "config": {"model": config.model.model_dump(mode="json"), "dpo": dpo.model_dump(mode="json"),
                   "experts": config.experts.model_dump(mode="json")},
    }
    storage.write_json(storage.join(folder, EXPERT_JSON), meta)
    with tracking.child_run(f"expert/{spec.slug}"):
        mlflow.log_dict(meta, EXPERT_JSON)
    return record | {"status": "trained", "lora": meta["lora"], "steps": meta["steps"]}


def _trial(params: dict[str, str], *, config: Config, specs: dict[str, ExpertSpec], pairs: str,
           env: dict[str, str], benign: ray.data.Dataset | None) -> dict[str, Any]:
    """Ray Tune trial: drive one expert's trainer."""
    os.environ.update(env)
    return fit_expert(config, specs[params["expert"]], pairs, env, benign)


# -- all experts ------------------------------------------------------------------------------------

def worker_resources(config: Config) -> dict[str, float]:
    """What one training worker reserves: its CPUs, a GPU with ``use_gpu``, and ``worker_resources``."""
    experts = config.experts
    return {"CPU": experts.cpus_per_worker} | ({"GPU": 1.0} if experts.use_gpu else {}) | experts.worker_resources


def concurrency(config: Config, experts_to_train: int) -> int:
    """How many experts train at once: ``experts.max_concurrent``, bounded by what the cluster holds now.

    Each expert reserves ``num_workers`` x :func:`worker_resources`; :data:`DATA_CPUS` stay free
    for the pair reads, which would otherwise wait forever behind the trainers.
    """
    available = ray.cluster_resources()
    available["CPU"] = available.get("CPU", 0.0) - DATA_CPUS
    need = worker_resources(config)
    fits = min(available.get(k, 0.0) // (v * config.experts.num_workers) for k, v in need.items() if v > 0)
    if fits < 1:
        logger.warning("experts: the cluster has %s, one expert needs %d x %s plus %s CPU to read pairs; "
                       "waiting for an autoscaler", ray.cluster_resources(), config.experts.num_workers, need,
                       DATA_CPUS)
    return int(max(1, min(config.experts.max_concurrent, experts_to_train, fits)))


def train_experts(config: Config, pairs: str | None = None,
                  names: list[str] | None = None) -> dict[str, dict]:
    """Train every configured expert not yet finished, :func:`concurrency` of them at a time.

    ``names`` narrows the experts (categories and/or ``all``); ``pairs`` defaults to the dataset
    the generation stage renders for ``config``. Needs an active MLflow run or
    ``$SAFETYDPO_PARENT_RUN_ID`` (the experts log as its child runs). Returns a record per expert;
    raises :class:`ExpertError` after the other experts finished when any failed.
    """
    names = names or expert_names(config)
    pairs = pairs or default_pairs(config)
    specs = scan_pairs(pairs, names, config.experts.num_workers, tuple(expert_categories(config)))
    records = {s.name: {"name": s.name, "status": "skipped", "lora": storage.join(
        expert_dir(config.run_root, s.name), WEIGHTS_NAME)} for s in specs.values() if is_finished(config, s)}
    todo = {name: spec for name, spec in specs.items() if name not in records}
    logger.info("experts: %d finished already %s", len(records), sorted(records))
    if todo:
        at_once = concurrency(config, len(todo))
        logger.info("experts: training %s, %d at once", sorted(todo), at_once)
        env = tracking.worker_env()
        # The preservation term's benign images are the same for every expert: one copy in the object store.
        preserving = any(config.experts.dpo_for(config.dpo, name).preserve_weight for name in todo)
        benign = benign_dataset(pairs_files(pairs), pairs) if preserving else None
        trial = tune.with_parameters(_trial, config=config, specs=todo, pairs=pairs, env=env, benign=benign)
        tuner = tune.Tuner(
            tune.with_resources(trial, TRIAL_RESOURCES),
            param_space={"expert": tune.grid_search(list(todo))},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage.join(config.run_root, EXPERTS_DIR, RAY_DIR),
                failure_config=tune.FailureConfig(max_failures=config.experts.max_failures), verbose=0,
            ),
        )
        for result in tuner.fit():
            name = result.config["expert"]
            if result.error is not None:
                records[name] = {"name": name, "status": "failed", "error": str(result.error)}
            else:
                records[name] = {k: result.metrics[k] for k in ("name", "status", "fingerprint", "checkpoint",
                                                                 "seconds", "steps", "lora", "error")
                                 if k in result.metrics}
    failed = [r for r in records.values() if r["status"] == "failed"]
    if failed:
        raise ExpertError("expert(s) failed, the others finished:\n  " +
                          "\n  ".join(f"{r['name']}: {r['error']}" for r in failed))
    return records


def describe(records: dict[str, dict]) -> dict[str, float]:
    """Headline numbers of :func:`train_experts`' records for the pipeline summary."""
    count = {s: sum(r["status"] == s for r in records.values()) for s in ("trained", "skipped")}
    return {"experts/trained": count["trained"], "experts/skipped": count["skipped"]}

