"""The HTTP API's request and response models, OpenAI's images API plus this project's fields, with
bounds taken from the config and the model.

A request is what an OpenAI images client sends (``prompt``, ``n``, ``size`` "WxH", ``response_format``,
``model``, ``user``) plus ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``seed``,
``width`` and ``height``. Fields this API does not know are ignored (the response names them in a
``Warning`` header). Bounds are enforced by pydantic, so a bad request answers 400 naming the field before
any work reaches the model; in-range settings are then snapped to a grid (sizes to multiples of
:data:`SIZE_STEP`, steps to ``serve.steps_grid``, guidance to ``serve.guidance_grid``) so near-identical
requests share a pipeline call, and the response says what was used. The request model is built per
deployment (:func:`request_model`) because its bounds depend on the served model; FastAPI publishes them
in the OpenAPI schema at ``/docs``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from diffusers import AutoencoderKL, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from safetydpo.config import Config
from safetydpo.model_ids import BASE, CHAMPION, MERGED, ModelIdError, expert_id, mlflow_uri
from safetydpo.pipelines import model_path

MAX_SEED = 2**31 - 1  # image i of a request is drawn from seed + i, so keep room below 2**63
SIZE_STEP = 8  # the VAE downsamples by 8 on Stable Diffusion (4 on the toy model)
MODEL_HELP = ("merged (default) or champion; with the operator key also base, expert:<category> and "
              "mlflow:<name>/<version|alias>")
_SIZE = r"^[0-9]{1,5}x[0-9]{1,5}$"


def canonical_model_id(model: str) -> str:
    """What the API serves: ``merged``, ``champion``, ``base``, ``expert:<slug>`` (category in any spelling)
    or ``mlflow:<name>/<ref>``; the ids evaluation knows besides (paths, SLD...) are not served."""
    if model in (MERGED, CHAMPION, BASE):
        return model
    kind, _, rest = model.partition(":")
    if kind == "expert" and rest:
        return expert_id(rest)
    if kind == "mlflow":
        mlflow_uri(model)  # checks the form
        return model
    raise ModelIdError(
        f"unknown model {model[:80]!r}; expected {MERGED!r}, {CHAMPION!r}, {BASE!r}, 'expert:<category>' "
        "or 'mlflow:<registered name>/<version or alias>'"
    )


class Limits(BaseModel):
    """What one request may ask of the served model; defaults for what it leaves out."""

    model_config = ConfigDict(frozen=True)

    max_prompt_tokens: int  # tokens incl. begin/end markers: the text encoder's window at most
    max_images: int
    max_steps: int
    max_guidance_scale: float
    native_size: int  # pixels; the default width and height
    min_size: int
    max_size: int
    default_steps: int
    default_guidance_scale: float
    default_negative_prompt: str | None = None
    steps_grid: int = 1
    guidance_grid: float = 0.0  # 0: not snapped

    @property
    def max_prompt_chars(self) -> int:
        """A cheap cap checked before tokenizing, so a megabyte prompt is refused without work."""
        return 32 * self.max_prompt_tokens

    @classmethod
    def for_model(cls, config: Config, tokenizer_max_length: int) -> Limits:
        """Bounds from ``config.serve``, the model's text window and its native resolution.

        Sizes go from half to twice the native resolution, in steps of 8 pixels.
        """
        native = config.model.resolution or native_resolution(config)
        return cls(
            max_prompt_tokens=min(config.serve.max_prompt_tokens, tokenizer_max_length),
            max_images=config.serve.max_images,
            max_steps=config.serve.max_steps,
            max_guidance_scale=config.serve.max_guidance_scale,
            native_size=native,
            min_size=max(SIZE_STEP, native // 2 // SIZE_STEP * SIZE_STEP),
            max_size=2 * native,
            default_steps=min(config.generation.num_inference_steps, config.serve.max_steps),
            default_guidance_scale=min(config.generation.guidance_scale, config.serve.max_guidance_scale),
            default_negative_prompt=config.generation.negative_prompt,
            steps_grid=config.serve.steps_grid,
            guidance_grid=config.serve.guidance_grid,
        )

    def snap(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its size, steps and guidance on the grid (within the bounds it passed)."""
        def nearest(value: float, step: float, low: float, high: float) -> float:
            return min(max(round(value / step) * step, low), high) if step else value

        steps = request.num_inference_steps
        if steps > self.steps_grid:
            top = self.max_steps // self.steps_grid * self.steps_grid or self.max_steps
            steps = int(nearest(steps, self.steps_grid, self.steps_grid, top))
        return request.model_copy(update={
            "width": int(nearest(request.width, SIZE_STEP, self.min_size, self.max_size)),
            "height": int(nearest(request.height, SIZE_STEP, self.min_size, self.max_size)),
            "num_inference_steps": steps,
            "guidance_scale": round(nearest(request.guidance_scale, self.guidance_grid, 0.0,
                                            self.max_guidance_scale), 6),
        })


def native_resolution(config: Config) -> int:
    """UNet sample size x VAE downsampling, read from the model's config files (no weights loaded)."""
    path = model_path(config.model)
    unet = UNet2DConditionModel.load_config(path, subfolder="unet", revision=config.model.revision)
    vae = AutoencoderKL.load_config(path, subfolder="vae", revision=config.model.revision)
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


class GenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``; :func:`request_model` adds the deployment's bounds.

    Unknown fields are kept aside (``model_extra``) and reported, not refused: OpenAI clients send
    fields of other vendors' models (``quality``, ``style``...).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    negative_prompt: str | None = None
    model: str = MERGED
    n: int = 1
    size: str | None = Field(None, pattern=_SIZE, description="WIDTHxHEIGHT in pixels (OpenAI's form)")
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    response_format: Literal["b64_json", "png"] = "b64_json"
    user: str | None = Field(None, max_length=256)

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        return canonical_model_id(model)

    @model_validator(mode="before")
    @classmethod
    def _size_sets_width_and_height(cls, data: object) -> object:
        """OpenAI's ``size`` "WxH" fills ``width`` and ``height``; given both ways, they must agree."""
        size = data.get("size") if isinstance(data, dict) else None
        if not isinstance(size, str) or not re.fullmatch(_SIZE, size):
            return data  # no size, or a bad one: the field's own pattern names it
        width, height = (int(v) for v in size.split("x"))
        for field, value in (("width", width), ("height", height)):
            if data.get(field) not in (None, value):
                raise ValueError(f"size {size} disagrees with {field} {data[field]!r}: send one of them")
        return {**data, "width": width, "height": height}

    @model_validator(mode="after")
    def _png_is_one_image(self) -> GenerationRequest:
        if self.response_format == "png" and self.n != 1:
            raise ValueError("response_format 'png' returns one image; ask n=1 or use 'b64_json'")
        return self

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def request_model(limits: Limits, count_tokens: Callable[[str], int]) -> type[GenerationRequest]:
    """The request model of one deployment: ``limits`` as field bounds, token counts by its tokenizer."""
    chars, tokens = limits.max_prompt_chars, limits.max_prompt_tokens
    size = {"ge": limits.min_size, "le": limits.max_size,
            "description": f"pixels, rounded to a multiple of {SIZE_STEP}"}

    def fits_text_encoder(cls: type, text: str | None) -> str | None:
        if text is not None and (counted := count_tokens(text)) > tokens:
            raise ValueError(f"{counted} tokens; this model reads at most {tokens}")
        return text

    return create_model(
        "GenerationRequest",
        __base__=GenerationRequest,
        __validators__={"fits_text_encoder": field_validator("prompt", "negative_prompt")(fits_text_encoder)},
        prompt=(str, Field(min_length=1, max_length=chars, description=f"at most {tokens} tokens")),
        negative_prompt=(str | None, Field(limits.default_negative_prompt, max_length=chars)),
        model=(str, Field(MERGED, max_length=256, description=MODEL_HELP)),
        n=(int, Field(1, ge=1, le=limits.max_images, description="images; image i uses seed + i")),
        num_inference_steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps,
                                        description=f"above {limits.steps_grid}, rounded to a multiple of it")),
        guidance_scale=(float, Field(limits.default_guidance_scale, ge=0.0, le=limits.max_guidance_scale,
                                     allow_inf_nan=False,
                                     description=f"rounded to a multiple of {limits.guidance_grid}")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="random when left out")),
        width=(int, Field(limits.native_size, **size)),
        height=(int, Field(limits.native_size, **size)),
    )


class ImageData(BaseModel):
    b64_json: str  # PNG bytes, base64
    seed: int


class GenerationResponse(BaseModel):
    """OpenAI's images response (``created``, ``data``) plus what was rendered and how."""

    created: int  # Unix seconds
    data: list[ImageData]
    model: str
    size: str  # WxH actually rendered (after snapping)
    num_inference_steps: int
    guidance_scale: float
    latency_ms: float  # time spent in the server, from validated request to encoded images


class ModelCard(BaseModel):
    id: str
    source: str | None = None  # LoRA file or models:/ URI; None for the base model
    requires_key: bool = False
    ready: bool = True  # False: listed so clients see it is coming, but requests answer 503 (see ``detail``)
    detail: str | None = None  # why a model is not ready and what to run
    metrics: dict[str, float] | None = None  # eval/<model>/<benchmark>/metrics.json: ip/overall, ip/<slug>...
    baseline: dict[str, float] | None = None  # the base model's figures on the same benchmark, to compare


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
