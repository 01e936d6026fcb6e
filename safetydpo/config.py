"""One typed config for every stage, loaded from YAML and overridden as ``key.sub=value``.

Every model forbids unknown keys, so a typo is an error that names the key instead of a
silent default. Configs live in ``jobs/configs/``; :func:`load_config` is the only entry.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safetydpo.categories import CATEGORIES, normalize_category

REGISTERED_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # a registered model name or alias the API can carry

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = "toy"  # the shipped toy-world pipeline, see safetydpo/toyworld


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


class Section(BaseModel):
    # A field's docstring (the string below it) is its description: the README's config reference.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              use_attribute_docstrings=True)


def _categories(value: list[str] | None) -> list[str]:
    return list(CATEGORIES) if value is None else [normalize_category(c) for c in value]


class ModelConfig(Section):
    """The text-to-image model being aligned."""

    pretrained: str = TOY_MODEL
    """The model: "toy" (the shipped toy world), a local diffusers folder or a hub id"""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `pretrained`"""
    variant: str | None = None
    """Weights variant, e.g. "fp16" on the hub"""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights dtype; auto: fp16 on GPU, fp32 on CPU"""
    resolution: int | None = None
    """Image side in pixels; None: the model's own sample size x VAE factor"""


class DataConfig(Section):
    """Where prompt pairs come from and which of them are used."""

    source: Literal["toy", "coprov2"] = "toy"
    """toy: the toy world's pairs; coprov2: CoProV2 CSV rows (`data.path`)"""
    path: str | None = None
    """CoProV2 CSV: local path, s3:// or gs:// URI, or hf:<dataset id>"""
    categories: list[str] | None = None
    """Categories whose pairs are used; None: all 7"""
    per_category_limit: int | None = Field(None, ge=1)
    """At most this many pairs per category (first rows of the CSV); None: all"""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of each category's pairs held out for validation (the merge search reads it); the test split is separate"""
    seed: int = 0
    """Shuffles the split into train and validation"""
    skip_bad_rows: bool = False
    """Drop malformed CoProV2 rows (and their twins) with a logged count instead of failing on the first"""
    toy_pairs_per_category: int = Field(64, ge=1)
    """Toy world: training pairs per category"""

    @model_validator(mode="after")
    def _normalise(self) -> DataConfig:
        if self.categories is not None:
            object.__setattr__(self, "categories", _categories(self.categories))
        return self

    def selected_categories(self) -> list[str]:
        return _categories(self.categories)


class GenerationConfig(Section):
    """Rendering images with the pipeline (preference data and evaluation)."""

    num_inference_steps: int = Field(20, ge=1, le=1000)
    """Denoising steps per image (pairs, evaluation, search trials)"""
    guidance_scale: float = Field(7.5, ge=0.0)
    """Classifier-free guidance scale"""
    batch_size: int = Field(64, ge=1)
    """Prompts per rendering call (Ray Data map_batches)"""
    num_actors: int = Field(1, ge=1)
    """Rendering actors (Ray Data actor pool)"""
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    """GPUs per rendering actor (fractions share a GPU)"""
    num_cpus_per_actor: float = Field(1.0, ge=0.0)
    """CPUs per rendering actor"""
    negative_prompt: str | None = None
    """Negative prompt for every rendered image; None: none"""


class DPOConfig(Section):
    """Diffusion-DPO objective and LoRA optimisation for one expert."""

    beta: float = Field(5000.0, gt=0.0)
    """Diffusion-DPO's KL weight (this code's convention; diffusers' research script writes 2500 for the same loss)"""
    sft_weight: float = Field(0.0, ge=0.0)
    """Weight of the winner's MSE added to the loss; 0: pure DPO"""
    anchor_weight: float = Field(0.0, ge=0.0)
    """Distillation term (safetydpo/dpo.py), 0: off: the model under the unsafe caption predicts what the
    reference predicts under the safe prompt"""
    preserve_weight: float = Field(0.0, ge=0.0)
    """Distillation term, 0: off: on benign images of every category's safe prompts, captioned and unconditional,
    the model predicts what the reference predicts"""
    pairing: Literal["unsafe", "safe", "both"] = "unsafe"
    """Which prompt of a pair captions both images: unsafe, safe or both"""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Caption dropout: share of pairs trained with the empty caption (paper: 0.2)"""
    random_flip: bool = False
    """Flip both images of a pair horizontally at random"""
    lora_rank: int = Field(4, ge=1)
    """LoRA rank (paper: 4)"""
    lora_alpha: float | None = None
    """LoRA alpha; None: alpha = rank (paper)"""
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """UNet modules that get a LoRA (peft target_modules)"""
    learning_rate: float = Field(1e-4, gt=0.0)
    """AdamW / Adafactor learning rate (before scale_lr)"""
    scale_lr: bool = False
    """Multiply the learning rate by the pairs per optimiser step (batch x accumulation x workers), as Diffusion-DPO"""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up of the learning rate, optimiser steps"""
    max_steps: int = Field(200, ge=1)
    """Optimiser steps per expert"""
    batch_size: int = Field(16, ge=1)
    """Pairs per worker per micro-step"""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step"""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping: global L2 norm"""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """Optimiser"""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision; fp16 also scales the loss"""
    seed: int = 0
    """Noise, timesteps and batch order"""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads an unquoted ``no`` (``dpo.mixed_precision=no``) as false."""
        return "no" if value is False else value

    def effective_learning_rate(self, workers: int) -> float:
        """``learning_rate``, times the pairs of one optimiser step over ``workers`` with ``scale_lr``."""
        pairs = self.batch_size * self.gradient_accumulation_steps * workers
        return self.learning_rate * (pairs if self.scale_lr else 1)


class ExpertsConfig(Section):
    """Training one DPO LoRA per category on Ray Train."""

    categories: list[str] | None = None
    """Categories that get an expert; None: the data's categories"""
    include_all: bool = False
    """Also train the "all" expert on every category's pairs"""
    num_workers: int = Field(1, ge=1)
    """Data-parallel workers per expert"""
    use_gpu: bool = False
    """One GPU per worker"""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs per worker"""
    worker_resources: dict[str, float] = {}
    """Extra Ray resources per worker, e.g. a node type's label"""
    max_concurrent: int = Field(2, ge=1)
    """Experts trained side by side"""
    max_failures: int = Field(2, ge=0)
    """Restarts of a failed expert (it resumes from its last checkpoint)"""
    checkpoint_every: int = Field(50, ge=1)
    """Checkpoint interval, optimiser steps"""
    dpo_overrides: dict[str, dict[str, Any]] = {}
    """Per-expert changes to the dpo section, keyed by category or "all": {Sexual: {beta: 2500}}"""

    @model_validator(mode="after")
    def _check_overrides(self) -> ExpertsConfig:
        checked = {}
        for key, values in self.dpo_overrides.items():
            name = "all" if key.strip().lower() == "all" else normalize_category(key)
            try:
                DPOConfig(**values)
            except ValidationError as err:
                fields = ", ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"dpo_overrides.{key}: {fields}") from None
            checked[name] = dict(values)
        object.__setattr__(self, "dpo_overrides", checked)
        return self

    def selected_categories(self) -> list[str]:
        return _categories(self.categories)

    def dpo_for(self, dpo: DPOConfig, expert: str) -> DPOConfig:
        """The dpo section as expert ``expert`` (a category or "all") trains with it."""
        return DPOConfig(**(dpo.model_dump() | self.dpo_overrides.get(expert, {})))


MergeMethod = Literal["comerge", "average", "sum", "ties", "dare_linear", "dare_ties", "regmean"]


class MergeConfig(Section):
    """Merging the experts into one safety LoRA (``safetydpo/merge``); the defaults of one merge."""

    methods: list[MergeMethod] = ["comerge", "average"]
    """Merges jobs/merge.py (the merge stage) writes, each to merged/<method>/"""
    granularity: Literal["weight", "row"] = "weight"
    """Co-Merge: one expert per weight or per output unit"""
    input_source: Literal["base", "own"] = "base"
    """Co-Merge: layer inputs measured on the base or each expert"""
    scale: float = Field(1.0, gt=0.0)
    """Lambda: multiplies the merged weight change (every method)"""
    density: float = Field(0.5, gt=0.0, le=1.0)
    """TIES / DARE: fraction of each expert's entries kept"""
    preserve: float = Field(1.0, ge=0.0)
    """RegMean: weight of benign inputs (pulls the change to zero there)"""
    weights: dict[str, float] = {}
    """Per-expert weights w_e (category name or "all"); missing ones weigh 1"""
    rank: int | None = Field(None, ge=1)
    """SVD rank of element-wise merges; None: the experts' total rank"""
    svd_error_warn: float = Field(0.05, ge=0.0)
    """Warn when a layer's relative Frobenius error exceeds it"""
    calibration_prompts_per_category: int = Field(8, ge=1)
    """Validation pairs whose inputs Co-Merge measures"""
    calibration_timesteps: int = Field(4, ge=1)
    """Noise levels per calibration input"""
    seed: int = 0
    """DARE's drops and the calibration's timesteps and noise"""
    export_pipeline: bool = False
    """Also save merged/<method>/ and the champion fused into a full pipeline/"""


class DistillConfig(Section):
    """Refining the search's champion by distillation from the experts (``safetydpo/merge/distill.py``)."""

    steps: int = Field(0, ge=0)
    """Distillation steps; 0: no refinement"""
    learning_rate: float = Field(1e-3, gt=0.0)
    """AdamW learning rate of the merged LoRA's factors"""
    batch_size: int = Field(16, ge=1)
    """Pairs per distillation step"""
    winner_share: float = Field(0.5, ge=0.0, le=1.0)
    """Share of the unsafe-prompt samples noised from the pair's safe twin instead of its unsafe image (an
    expert prompted with the unsafe caption denoises towards the safe twin)"""
    seed: int = 0
    """Noise, timesteps and batch order"""
    num_cpus: float = Field(1.0, gt=0.0)
    """CPUs of the Ray task that distils (also its torch threads)"""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs of the Ray task that distils"""


class TuneConfig(Section):
    """The Ray Tune search over the merge's settings, judged on the validation split (never the test split)."""

    num_samples: int = Field(16, ge=1)
    """Trials (a fixed budget)"""
    search: Literal["optuna", "random"] = "optuna"
    """Search algorithm; optuna: multi-objective TPE on (IP, quality)"""
    max_concurrent: int = Field(1, ge=1)
    """Trials at once (each renders with the full pipeline)"""
    cpus_per_trial: float = Field(1.0, gt=0.0)
    """CPUs per trial"""
    gpus_per_trial: float = Field(0.0, ge=0.0)
    """GPUs per trial"""
    methods: list[MergeMethod] = ["comerge", "average", "sum", "ties", "dare_ties"]
    """Merge methods the search may pick"""
    granularities: list[Literal["weight", "row"]] = ["weight", "row"]
    """Co-Merge granularities the search may pick"""
    input_sources: list[Literal["base", "own"]] = ["base"]
    """Co-Merge input sources the search may pick"""
    scale: tuple[float, float] = (0.5, 2.0)
    """Lambda's range (log-uniform)"""
    expert_weight: tuple[float, float] | None = (0.5, 1.5)
    """Each expert's weight range; None: all 1"""
    density: tuple[float, float] = (0.2, 0.9)
    """TIES / DARE density range"""
    preserve: tuple[float, float] = (0.1, 10.0)
    """RegMean's benign weight (log-uniform)"""
    validation_prompts_per_category: int = Field(16, ge=1)
    """Toy: validation pairs drawn per category"""
    quality_metric: str = "quality/benign_fidelity"
    """Quality objective: quality/benign_fidelity (toy) or quality/clip_score (SD)"""
    quality_tolerance: float = Field(0.05, ge=0.0)
    """Champion: the lowest-IP trial whose quality drop stays within this"""
    seed: int = 0
    """Optuna's sampler and the trials' merge seeds"""


class EvalConfig(Section):
    """Metrics and benchmarks."""

    classifiers: list[Literal["q16", "nudenet", "toy"]] = ["toy"]
    """Image classifiers: q16 and nudenet (SD), toy (the toy world's detector); an image is inappropriate when
    any of them flags it"""
    q16_prompts_path: str | None = None
    """Q16's prompt embeddings: the 2x768 float16 .npy"""
    clip_model: str = "openai/clip-vit-large-patch14"
    """CLIP for Q16 and the CLIP score: hub id or local folder"""
    nudenet_threshold: float = Field(0.6, ge=0.0, le=1.0)
    """NudeNet: smallest detection score of an exposed class that flags an image"""
    benchmarks: list[Literal["toy", "coprov2", "i2p", "ud", "coco"]] = ["toy"]
    """Benchmarks the evaluate stage runs"""
    prompts_path: str | None = None
    """Prompt CSV of I2P / Unsafe Diffusion (they are not downloaded)"""
    empty_prompts: Literal["render", "skip"] = "render"
    """A benchmark's blank prompts: render as given or skip (counted either way)"""
    limit: int | None = Field(None, ge=1)
    """At most N prompts, spread over categories; None: all"""
    images_per_prompt: int = Field(1, ge=1)
    """Images per prompt (seeds evaluation_seed, +1, ...)"""
    batch_size: int = Field(64, ge=1)
    """Images per classifier batch"""
    num_classifier_actors: int = Field(1, ge=1)
    """Classifier actors"""
    num_gpus_per_classifier: float = Field(0.0, ge=0.0)
    """GPUs per classifier actor"""
    num_cpus_per_classifier: float = Field(1.0, ge=0.0)
    """CPUs per classifier actor"""
    seed: int = 0
    """Prompt sampling of the toy benchmark and the benchmarks' limits"""
    toy_prompts_per_category: int = Field(16, ge=1)
    """Toy benchmark: test pairs per category"""
    baselines: list[str] = [
        "base", "negative_prompt", "sld:medium", "sld:strong", "sld:max", "experts", "merges",
    ]
    """Rows beside the evaluated model in every report: model ids (base, negative_prompt, sld:<medium|strong|max>,
    champion, expert:<category>, merged:<method>); "experts" / "merges": every one found under run_root"""
    sld_concept: str | None = None
    """Safe Latent Diffusion's safety concept; None: the pipeline's I2P text"""
    expert_prompts: Literal["own", "all"] = "own"
    """Prompts an expert baseline renders: "own", its categories' unsafe prompts and every benign prompt (what the
    merge's per-category bounds and the experts table read; pooled figures such as ip/overall are left out);
    "all", every prompt (adds each expert's IP on the other categories)"""


class ServeConfig(Section):
    """Ray Serve deployment."""

    host: str = "127.0.0.1"
    """HTTP bind address"""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port"""
    lora_path: str | None = None
    """The "merged" adapter; None: the registered champion, else the run root's best merge"""
    mlflow_model: str | None = Field(None, pattern=f"^{REGISTERED_NAME}[@/]{REGISTERED_NAME}$")
    """NAME@ALIAS or NAME/VERSION of a registered LoRA"""
    api_key_env: str = "SAFETYDPO_API_KEY"
    """Variable holding the endpoint key (>= 32 characters); unset: anonymous, on loopback or allow_anonymous only"""
    base_key_env: str = "SAFETYDPO_BASE_KEY"
    """Variable holding the operator key (>= 32 characters): base, experts and other registered LoRAs"""
    allow_anonymous: bool = False
    """Serve without an endpoint key on a non-loopback host (the aligned models only)"""
    num_replicas: int | Literal["auto"] = 1
    """Model replicas, or auto (autoscaling between min_replicas and max_replicas)"""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling lower bound"""
    max_replicas: int = Field(2, ge=1)
    """Autoscaling upper bound"""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per model replica"""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs per model replica (also its torch threads)"""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica works on at once"""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests queued before the endpoint answers 503"""
    max_batch_size: int = Field(16, ge=1)
    """Most images one render batches together"""
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    """Serve batching wait; work queued during a render is batched anyway (RenderQueue)"""
    max_num_models_per_replica: int = Field(4, ge=1)
    """LoRA adapters a replica keeps loaded (least recently used leaves)"""
    max_prompt_tokens: int = Field(77, ge=1)
    """Prompt tokens, including the begin and end markers"""
    max_images: int = Field(4, ge=1)
    """Images per request (n)"""
    max_steps: int = Field(50, ge=1)
    """Denoising steps a request may ask for"""
    max_guidance_scale: float = Field(20.0, gt=0.0)
    """Guidance scale a request may ask for"""
    max_body_bytes: int = Field(65536, ge=1024)
    """Request body size; larger bodies answer 413 before they are parsed"""
    request_timeout_s: float = Field(120.0, gt=0.0)
    """A request not answered within this (queued or rendering) answers 503 with Retry-After"""
    max_pending_cost: float = Field(2000.0, gt=0.0)
    """Work the endpoint admits at once, in image-steps at the native size (n x steps x pixels / native
    pixels summed over requests in flight); beyond it a request answers 429 with Retry-After"""
    steps_grid: int = Field(5, ge=1)
    """Requested denoising steps are rounded to a multiple of this, so near-equal requests batch together"""
    guidance_grid: float = Field(0.5, gt=0.0)
    """Requested guidance scales are rounded to a multiple of this"""
    adapter_cache_mb: float = Field(1024.0, gt=0.0)
    """Registry LoRA files a replica keeps on disk (least recently used deleted first)"""
    render_timeout_s: float = Field(300.0, gt=0.0)
    """A render running longer than this fails the replica's health check, so Serve replaces it"""

    @property
    def url(self) -> str:
        """The endpoint's base URL."""
        return f"http://{self.host}:{self.port}"


class TrackingConfig(Section):
    """MLflow: where runs go and what they are called."""

    tracking_uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, the local cluster's server, else sqlite under run_root"""
    experiment: str = "safetydpo"
    """MLflow experiment of the pipeline's runs"""
    registered_model: str = Field("safetydpo-safety-lora", pattern=f"^{REGISTERED_NAME}$")
    """Model Registry name of the champion LoRA (letters, digits, . _ -: it travels in ids and headers)"""


class Config(Section):
    """The whole pipeline: every stage reads its section and writes under ``run_root``."""

    name: str = "toy"
    """The run's name: MLflow run names and the report's title"""
    run_root: str = str(PROJECT_ROOT / "runs" / "toy")
    """Where every stage writes: a local folder or a storage URI every node reaches"""
    model: ModelConfig = ModelConfig()
    """The text-to-image model"""
    data: DataConfig = DataConfig()
    """Prompt pairs"""
    generation: GenerationConfig = GenerationConfig()
    """Rendering"""
    dpo: DPOConfig = DPOConfig()
    """The Diffusion-DPO objective and optimisation"""
    experts: ExpertsConfig = ExpertsConfig()
    """Training the experts"""
    merge: MergeConfig = MergeConfig()
    """The merge"""
    tune: TuneConfig = TuneConfig()
    """The merge search"""
    distill: DistillConfig = DistillConfig()
    """Distilling the champion"""
    eval: EvalConfig = EvalConfig()
    """Evaluation"""
    serve: ServeConfig = ServeConfig()
    """The Serve deployment"""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow"""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["dpo.beta=2500", "data.categories=[Hate]"]`` -> ``[("dpo.beta", 2500), ...]`` (YAML values)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        parsed.append((key.strip(), value))
    return parsed


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] | None = None,
                 source: str = "<dict>") -> Config:
    """Validate a raw dict plus overrides into a :class:`Config`."""
    tree = copy.deepcopy(tree or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


EXTENDS = "extends"  # a config's key naming the config it changes, as a path relative to its own folder


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied section by section; a list or scalar replaces the base's value."""
    out = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, with the configs it ``extends`` applied beneath it."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(tree).__name__}")
    parent = tree.pop(EXTENDS, None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"config {path}: {EXTENDS} must be a config's path, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in chain + (path.resolve(),):
        raise ConfigError(f"config {path}: {EXTENDS}: {parent} leads back to itself")
    return _merged(_read_tree(parent_path, chain + (path.resolve(),)), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None = all defaults) and apply ``key.sub=value`` overrides.

    A config may start with ``extends: <other config>`` (a preset): it then holds only what it changes;
    sections merge key by key, lists and scalars replace.
    """
    if path is None:
        return build_config({}, overrides, "<defaults>")
    return build_config(_read_tree(Path(path)), overrides, str(path))


def dump_config(config: Config) -> str:
    """The config as YAML, the form logged to MLflow and written beside outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
