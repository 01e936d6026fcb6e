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

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = "toy"  # the shipped toy-world pipeline, see safetydpo/toyworld


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _categories(value: list[str] | None) -> list[str]:
    return list(CATEGORIES) if value is None else [normalize_category(c) for c in value]


class ModelConfig(Section):
    """The text-to-image model being aligned."""

    pretrained: str = TOY_MODEL  # "toy", a local diffusers folder or a hub id
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" on the hub
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    resolution: int | None = None  # None: the model's own sample size x VAE factor


class DataConfig(Section):
    """Where prompt pairs come from and which of them are used."""

    source: Literal["toy", "coprov2"] = "toy"
    path: str | None = None  # CoProV2 CSV: local path, s3:// or gs:// URI, or hf:<dataset id>
    categories: list[str] | None = None  # None: all 7
    per_category_limit: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    skip_bad_rows: bool = False
    toy_pairs_per_category: int = Field(64, ge=1)  # toy world: train pairs per category

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
    guidance_scale: float = Field(7.5, ge=0.0)
    batch_size: int = Field(64, ge=1)  # prompts per map_batches call
    num_actors: int = Field(1, ge=1)  # actor pool size
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, ge=0.0)
    negative_prompt: str | None = None


class DPOConfig(Section):
    """Diffusion-DPO objective and LoRA optimisation for one expert."""

    beta: float = Field(5000.0, gt=0.0)
    sft_weight: float = Field(0.0, ge=0.0)  # weight of the winner's MSE added to the loss; 0: pure DPO
    # Distillation terms (safetydpo/dpo.py); 0: off. anchor: the model under the caption predicts what the
    # reference predicts under the safe prompt. preserve: the model predicts what the reference does on
    # benign images of every category's safe prompts, captioned and unconditional.
    anchor_weight: float = Field(0.0, ge=0.0)
    preserve_weight: float = Field(0.0, ge=0.0)
    pairing: Literal["unsafe", "safe", "both"] = "unsafe"  # which prompt is the caption
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    random_flip: bool = False
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = None  # None: alpha = rank (paper)
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    learning_rate: float = Field(1e-4, gt=0.0)
    scale_lr: bool = False  # lr x pairs per optimiser step (batch x accumulation x workers), as Diffusion-DPO
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)  # pairs per worker per micro-step
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0

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

    categories: list[str] | None = None  # None: the data's categories
    include_all: bool = False  # also train the "all" expert on every category's pairs
    num_workers: int = Field(1, ge=1)  # data-parallel workers per expert
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    worker_resources: dict[str, float] = {}  # extra Ray resources per worker, e.g. a node type's label
    max_concurrent: int = Field(2, ge=1)  # experts trained side by side
    max_failures: int = Field(2, ge=0)
    checkpoint_every: int = Field(50, ge=1)  # optimiser steps
    # Per-expert changes to the dpo section, keyed by category or "all": {Sexual: {beta: 2500}}.
    dpo_overrides: dict[str, dict[str, Any]] = {}

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

    methods: list[MergeMethod] = ["comerge", "average"]  # jobs/merge.py writes each to merged/<method>/
    granularity: Literal["weight", "row"] = "weight"  # Co-Merge: one expert per weight or per output unit
    input_source: Literal["base", "own"] = "base"  # Co-Merge: layer inputs measured on the base or each expert
    scale: float = Field(1.0, gt=0.0)  # lambda: multiplies the merged weight change
    density: float = Field(0.5, gt=0.0, le=1.0)  # TIES / DARE: fraction of each expert's entries kept
    preserve: float = Field(1.0, ge=0.0)  # RegMean: weight of benign inputs (pulls the change to zero there)
    weights: dict[str, float] = {}  # per expert (category name or "all"); missing ones weigh 1
    rank: int | None = Field(None, ge=1)  # SVD rank of element-wise merges; None: the experts' total rank
    svd_error_warn: float = Field(0.05, ge=0.0)  # warn when a layer's relative Frobenius error exceeds it
    calibration_prompts_per_category: int = Field(8, ge=1)  # validation pairs whose inputs Co-Merge measures
    calibration_timesteps: int = Field(4, ge=1)  # noise levels per calibration input
    seed: int = 0  # DARE's drops and the calibration's timesteps and noise
    export_pipeline: bool = False  # also save merged/<method>/ and the champion fused into a full pipeline/


class DistillConfig(Section):
    """Refining the search's champion by distillation from the experts (``safetydpo/merge/distill.py``)."""

    steps: int = Field(0, ge=0)  # 0: no refinement
    learning_rate: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(16, ge=1)
    seed: int = 0


class TuneConfig(Section):
    """The Ray Tune search over the merge's settings, judged on the validation split (never the test split)."""

    num_samples: int = Field(16, ge=1)  # trials
    search: Literal["optuna", "random"] = "optuna"  # optuna: multi-objective TPE on (IP, quality)
    max_concurrent: int = Field(1, ge=1)  # trials at once (each renders with the full pipeline)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    methods: list[MergeMethod] = ["comerge", "average", "sum", "ties", "dare_ties"]
    granularities: list[Literal["weight", "row"]] = ["weight", "row"]
    input_sources: list[Literal["base", "own"]] = ["base"]
    scale: tuple[float, float] = (0.5, 2.0)  # lambda's range (log-uniform)
    expert_weight: tuple[float, float] | None = (0.5, 1.5)  # each expert's weight range; None: all 1
    density: tuple[float, float] = (0.2, 0.9)
    preserve: tuple[float, float] = (0.1, 10.0)  # RegMean's benign weight (log-uniform)
    validation_prompts_per_category: int = Field(16, ge=1)  # toy: validation pairs drawn per category
    quality_metric: str = "quality/benign_fidelity"  # SD: quality/clip_score
    quality_tolerance: float = Field(0.05, ge=0.0)  # champion: lowest IP whose quality drop stays within this
    seed: int = 0


class EvalConfig(Section):
    """Metrics and benchmarks."""

    classifiers: list[Literal["q16", "nudenet", "toy"]] = ["toy"]
    q16_prompts_path: str | None = None  # the 2x768 float16 .npy of Q16 prompt embeddings
    clip_model: str = "openai/clip-vit-large-patch14"
    nudenet_threshold: float = Field(0.6, ge=0.0, le=1.0)
    benchmarks: list[Literal["toy", "coprov2", "i2p", "ud", "coco"]] = ["toy"]
    prompts_path: str | None = None
    empty_prompts: Literal["render", "skip"] = "render"  # a benchmark's blank prompts: render as given or skip; counted
    limit: int | None = Field(None, ge=1)
    images_per_prompt: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    num_classifier_actors: int = Field(1, ge=1)
    num_gpus_per_classifier: float = Field(0.0, ge=0.0)
    seed: int = 0
    toy_prompts_per_category: int = Field(16, ge=1)  # toy benchmark: test pairs per category
    # Rows beside the evaluated model in every report: base, negative_prompt, sld:<medium|strong|max>,
    # expert:<category>, merged:<method>; "experts" / "merges" = every one found under run_root.
    baselines: list[str] = [
        "base", "negative_prompt", "sld:medium", "sld:strong", "sld:max", "experts", "merges",
    ]
    sld_concept: str | None = None  # Safe Latent Diffusion's safety concept; None: the pipeline's I2P text


class ServeConfig(Section):
    """Ray Serve deployment."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    lora_path: str | None = None  # the "merged" adapter; None: the run root's merged LoRA
    mlflow_model: str | None = None  # NAME@ALIAS or NAME/VERSION of a registered LoRA
    api_key_env: str = "SAFETYDPO_API_KEY"  # endpoint key, off when the variable is unset
    base_key_env: str = "SAFETYDPO_BASE_KEY"  # key that unlocks the unaligned "base" model
    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, ge=0.0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)  # work queued during a render is batched anyway (RenderQueue)
    max_num_models_per_replica: int = Field(4, ge=1)
    max_prompt_tokens: int = Field(77, ge=1)
    max_images: int = Field(4, ge=1)
    max_steps: int = Field(50, ge=1)
    max_guidance_scale: float = Field(20.0, gt=0.0)


class TrackingConfig(Section):
    """MLflow: where runs go and what they are called."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under run_root
    experiment: str = "safetydpo"
    registered_model: str = "safetydpo-safety-lora"


class Config(Section):
    """The whole pipeline: every stage reads its section and writes under ``run_root``."""

    name: str = "toy"
    run_root: str = str(PROJECT_ROOT / "runs" / "toy")  # local folder or storage URI
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    dpo: DPOConfig = DPOConfig()
    experts: ExpertsConfig = ExpertsConfig()
    merge: MergeConfig = MergeConfig()
    tune: TuneConfig = TuneConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    tracking: TrackingConfig = TrackingConfig()


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None = all defaults) and apply ``key.sub=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path}: top level must be a mapping, got {type(tree).__name__}")
    return build_config(tree, overrides, source)


def dump_config(config: Config) -> str:
    """The config as YAML, the form logged to MLflow and written beside outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
