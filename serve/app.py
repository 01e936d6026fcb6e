"""The Ray Serve application: a FastAPI ingress in front of one multiplexed image-model deployment.

    serve run serve.app:app_builder config=jobs/configs/toy.yaml [lora=PATH] [mlflow_model=NAME@ALIAS]
    serve deploy serve/config.yaml     # python -m serve.config_gen --config jobs/configs/toy.yaml

``ImageModel`` holds the pipeline once per replica. LoRA adapters (``merged``, experts, registered
LoRAs) are loaded onto that one pipeline through Serve's multiplexing (an LRU of
``serve.max_num_models_per_replica`` adapters per replica) and requests are routed by their
multiplexed model id, so traffic for an adapter goes where it is already loaded. Requests for one
adapter are batched with ``@serve.batch`` and handed to a :class:`serve.render_queue.RenderQueue`, which
renders all queued work with equal settings in one ``safetydpo.rendering.render`` call, under a lock
that also covers switching adapters.

No ``from __future__ import annotations`` here: FastAPI reads the per-deployment request model
from the route's annotations at runtime.
"""

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from diffusers import DiffusionPipeline
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from mlflow.exceptions import MlflowException
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from safetydpo import cli, tracking
from safetydpo.config import Config, load_config
from safetydpo.model_ids import (
    BASE,
    MERGED,
    NOT_MERGED_YET,
    ModelCatalog,
    ModelUnavailable,
    NotMergedYet,
)
from safetydpo.pipelines import load_pipeline, model_path, png_bytes
from safetydpo.rendering import render
from serve.model_cards import card_of, eval_metrics, lora_source
from serve.render_queue import RenderQueue
from serve.schemas import (
    MAX_SEED,
    GenerationRequest,
    GenerationResponse,
    ImageData,
    Limits,
    ModelCard,
    ModelList,
    error_detail,
    request_model,
)

logger = logging.getLogger("ray.serve")
APP_NAME = "safetydpo"
MODEL_DEPLOYMENT = "ImageModel"
INGRESS_DEPLOYMENT = "Ingress"
PAGE = Path(__file__).with_name("page.html")
RETRY_AFTER_S = 1  # what a client told 503 waits before trying again
BATCHES_IN_FLIGHT = 64  # Serve batches a replica accepts at once; the RenderQueue coalesces them
INGRESS_HEADROOM = 64  # concurrent requests the ingress takes beyond what the model deployment can hold


@dataclass(frozen=True)
class Job:
    """One request's work for the model replica: ``n`` images, image i drawn from ``seed + i``."""

    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int

    @property
    def settings(self) -> tuple:
        """Jobs with equal settings share one pipeline call."""
        return self.negative_prompt, self.num_inference_steps, self.guidance_scale, self.width, self.height


def _images(jobs: list[Job]) -> int:
    """Batch size in images, so ``serve.max_batch_size`` bounds what one pipeline call renders."""
    return sum(job.n for job in jobs)


class Adapter:
    """A model id's LoRA loaded on the shared pipeline under its own name (None: base, LoRA off).

    Serve's multiplexing evicts the least recently used adapter by calling ``__del__``, which
    deletes it from the pipeline. A batch still holding an evicted adapter loads it again for
    its call and deletes it after, so eviction can never pull weights out from under a render.
    """

    def __init__(self, pipe: DiffusionPipeline, lock: threading.Lock, name: str | None,
                 path: str | None = None) -> None:
        self.pipe, self.lock, self.name, self.path = pipe, lock, name, path
        self.evicted = False
        if name is not None:
            with lock:
                self._load()

    def _load(self) -> None:
        folder, weight_name = os.path.split(self.path)
        self.pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=self.name)

    def _loaded(self) -> bool:
        return any(self.name in names for names in self.pipe.get_list_adapters().values())

    @contextmanager
    def active(self) -> Iterator[None]:
        """This adapter alone is on for the body; the caller holds the lock."""
        if self.name is None:
            self.pipe.disable_lora()
            yield
            return
        if not self._loaded():
            self._load()
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.name])
        try:
            yield
        finally:
            if self.evicted and self._loaded():
                self.pipe.delete_adapters(self.name)

    def __del__(self) -> None:
        if self.name is None or self.evicted:
            return
        self.evicted = True
        with self.lock:
            if self._loaded():
                self.pipe.delete_adapters(self.name)


def adapter_name(model_id: str) -> str:
    """A PEFT-safe adapter name (no dots) that is unique per model id."""
    return "a" + hashlib.sha256(model_id.encode()).hexdigest()[:16]


@serve.deployment(name=MODEL_DEPLOYMENT)
class ImageModel:
    """The pipeline, once per replica, with multiplexed LoRA adapters and dynamic batching."""

    def __init__(self, config: Config) -> None:
        # CPU math uses the replica's own CPUs (what Ray's OMP_NUM_THREADS means), not the whole node's.
        torch.set_num_threads(max(1, int(config.serve.num_cpus)))
        self.catalog = ModelCatalog.from_config(config)
        self.pipe = load_pipeline(config.model)
        self.lock = threading.Lock()
        self.cache_dir = tempfile.mkdtemp(prefix="safetydpo-serve-")

        async def load(model_id: str) -> Adapter:
            return await self._load_adapter(model_id)

        self.load_adapter = serve.multiplexed(
            max_num_models_per_replica=config.serve.max_num_models_per_replica)(load)
        images_per_call = max(config.serve.max_batch_size, config.serve.max_images)
        self.generate.set_max_batch_size(images_per_call)
        self.generate.set_batch_wait_timeout_s(config.serve.batch_wait_timeout_s)
        self.renders = RenderQueue(self._render, key=lambda job: job.settings, size=lambda job: job.n,
                                   max_images=images_per_call)

    async def _load_adapter(self, model_id: str) -> Adapter:
        source = await asyncio.to_thread(lora_source, self.catalog, model_id)
        if source is None:
            return Adapter(self.pipe, self.lock, None)
        path = await asyncio.to_thread(self.catalog.local_lora, source, self.cache_dir)
        try:
            return await asyncio.to_thread(Adapter, self.pipe, self.lock, adapter_name(model_id), path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelUnavailable(f"{model_id}: cannot load the LoRA {source}: {err}") from None

    # Serve forms the next batch while the last one renders; letting every formed batch through
    # (rather than Serve's default of one at a time) hands them all to the RenderQueue, which merges
    # whatever waited into the next pipeline call.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=_images,
                 max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def generate(self, jobs: list[Job]) -> list[list[bytes]]:
        """PNG bytes per job; Serve hands this replica only jobs for one multiplexed model id."""
        adapter = await self.load_adapter(serve.get_multiplexed_model_id())
        return await self.renders.submit(adapter, jobs)

    def _render(self, adapter: Adapter, jobs: list[Job]) -> list[list[bytes]]:
        """One pipeline call for ``jobs``, which share their sampling settings (``Job.settings``)."""
        first = jobs[0]
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        seeds = [job.seed + k for job in jobs for k in range(job.n)]
        with self.lock, adapter.active():
            images = render(self.pipe, prompts, seeds, num_inference_steps=first.num_inference_steps,
                            guidance_scale=first.guidance_scale, negative_prompt=first.negative_prompt,
                            height=first.height, width=first.width)
        pngs = iter(png_bytes(image) for image in images)
        return [[next(pngs) for _ in range(job.n)] for job in jobs]


def digest(secret: str | None) -> str | None:
    """SHA-256 of a key: deployments hold digests, so no key is stored in the cluster's metadata."""
    return hashlib.sha256(secret.encode()).hexdigest() if secret else None


def _matches(token: str | None, key_digest: str | None) -> bool:
    return bool(token and key_digest) and hmac.compare_digest(digest(token), key_digest)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field and why, without echoing the input (it may be huge or not JSON-able)."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class Ingress:
    """HTTP API, validation, keys and the comparison page; images come from ``ImageModel``."""

    def __init__(self, model: DeploymentHandle, config: Config, keys: dict[str, str | None]) -> None:
        self.model = model
        self.keys = keys  # {"api": digest or None, "base": digest or None}
        self.catalog = ModelCatalog.from_config(config)
        self.benchmarks = tuple(config.eval.benchmarks)
        tokenizer = AutoTokenizer.from_pretrained(model_path(config.model), subfolder="tokenizer",
                                                  revision=config.model.revision)
        self.limits = Limits.for_model(config, tokenizer.model_max_length)
        count_tokens = lambda text: len(tokenizer(text, verbose=False)["input_ids"])  # noqa: E731
        self.request_model = request_model(self.limits, count_tokens)
        self.registered: set[str] = set()  # mlflow:... ids served so far, listed by /v1/models
        self.page = PAGE.read_text()
        if self.catalog.merged() is None:
            logger.warning("safetydpo: %s; until then requests for %r answer 503", NOT_MERGED_YET, MERGED)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    def caller(self, token: str | None) -> str | None:
        """The bearer token, after the endpoint key check (the base key also opens the endpoint)."""
        if self.keys["api"] and not (_matches(token, self.keys["api"]) or _matches(token, self.keys["base"])):
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
        return token

    async def list_models(self) -> ModelList:
        def cards() -> list[ModelCard]:
            found = []
            source, metrics = card_of(self.catalog, self.benchmarks, MERGED)
            if source is None:
                found.append(ModelCard(id=MERGED, ready=False, detail=NOT_MERGED_YET))
            else:
                found.append(ModelCard(id=MERGED, source=source, metrics=metrics))
            if self.keys["base"]:
                found.append(ModelCard(id=BASE, requires_key=True,
                                       metrics=eval_metrics(self.catalog.run_root, self.benchmarks, BASE)))
            for model_id in [*self.catalog.experts(), *sorted(self.registered)]:
                source, metrics = card_of(self.catalog, self.benchmarks, model_id)
                found.append(ModelCard(id=model_id, source=source, metrics=metrics))
            return found

        return ModelList(data=await asyncio.to_thread(cards))

    async def generate(self, body: GenerationRequest, token: str | None) -> Response:
        started = time.perf_counter()
        model_id = body.model
        if model_id == BASE and not _matches(token, self.keys["base"]):
            reason = "send the base key as bearer token" if self.keys["base"] else "no base key is configured"
            raise HTTPException(403, f"the unaligned base model is restricted: {reason}")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        job = Job(body.prompt, body.negative_prompt, body.n, seed, body.num_inference_steps,
                  body.guidance_scale, body.width, body.height)
        images = await self._render(model_id, job)
        if model_id.startswith("mlflow:"):
            self.registered.add(model_id)
        latency_ms = round(1000 * (time.perf_counter() - started), 1)
        if body.response_format == "png":
            headers = {"X-Seed": str(seed), "X-Model": model_id, "X-Latency-Ms": str(latency_ms)}
            return Response(images[0], media_type="image/png", headers=headers)
        data = [ImageData(b64_json=base64.b64encode(png).decode(), seed=seed + i)
                for i, png in enumerate(images)]
        return JSONResponse(GenerationResponse(data=data, model=model_id, latency_ms=latency_ms).model_dump())

    async def _render(self, model_id: str, job: Job) -> list[bytes]:
        """Images from a model replica; one retry on another replica if the first one dies mid-call.

        The replica resolves ``model_id`` when it loads the adapter (once per replica, not per
        request); a model id with nothing behind it answers 422 from there. Rendering is a pure
        function of the job (seeded), so the retry returns the same images. Overload
        (``BackPressureError``) is left to Serve, which answers 503 with ``Retry-After``.
        """
        handle = self.model.options(multiplexed_model_id=model_id)
        try:
            try:
                return await handle.generate.remote(job)
            except RayActorError:  # the replica died mid-call: once more, on a live one
                return await handle.generate.remote(job)
        except ModelUnavailable as err:
            # Raised in the replica, it arrives as Ray's task error: its text carries actor ids, pids and
            # node addresses; the client gets only the original message.
            cause = err.cause if isinstance(err, RayTaskError) else err
            if isinstance(cause, NotMergedYet):
                raise HTTPException(503, str(cause)) from None
            raise HTTPException(422, error_detail("model", str(cause))) from None
        except RayActorError:
            raise HTTPException(503, "model replica lost; retry",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RayTaskError as err:
            if isinstance(err.cause, MlflowException):
                raise HTTPException(503, f"model registry unavailable: {err.cause.message}",
                                    headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            raise


def create_api(svc: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica; its request model carries that deployment's bounds."""
    api = FastAPI(title="safetydpo", summary="Safety-aligned text-to-image (SafetyDPO) on Ray Serve")
    api.add_exception_handler(RequestValidationError, _validation_error)
    bearer = HTTPBearer(auto_error=False, description="endpoint key, or the base key for model=base")
    body_model = svc.request_model

    def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str | None:
        return svc.caller(credentials.credentials if credentials else None)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return svc.page

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelList)
    async def models(_: Annotated[str | None, Depends(caller)]) -> ModelList:
        return await svc.list_models()

    @api.post("/v1/images/generations", response_model=GenerationResponse,
              responses={200: {"content": {"image/png": {}}, "description": "PNG (response_format png)"}})
    async def generations(body: body_model, token: Annotated[str | None, Depends(caller)]) -> Response:
        return await svc.generate(body, token)

    return api


def _backpressure() -> dict:
    """Overload answers 503 with ``Retry-After`` (Serve's own rejection, at either deployment)."""
    return {"status_code": 503, "retry_after_s": RETRY_AFTER_S}


def deployment_options(config: Config) -> dict[str, dict]:
    """Serve options of both deployments from ``config.serve``; ``serve/config.yaml`` holds the same."""
    s = config.serve
    if s.num_replicas == "auto":
        autoscaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                       "target_ongoing_requests": s.max_batch_size}
        scaling: dict = {"autoscaling_config": autoscaling}
        replicas = s.max_replicas
    else:
        scaling, replicas = {"num_replicas": s.num_replicas}, s.num_replicas
    model = {**scaling, "max_ongoing_requests": s.max_ongoing_requests,
             "max_queued_requests": s.max_queued_requests, "backpressure_config": _backpressure(),
             "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    # The ingress mostly waits on the model: room for all the model may hold or queue, plus
    # INGRESS_HEADROOM for what it answers itself (422, 403, /v1/models, the page) and for requests
    # in flight through the proxy's router, so overload surfaces as the model deployment's 503,
    # not as a second, smaller queue in front of it.
    queued = s.max_queued_requests
    ingress = {"num_replicas": 1,
               "max_ongoing_requests": replicas * s.max_ongoing_requests + max(queued, 0) + INGRESS_HEADROOM,
               "max_queued_requests": -1 if queued == -1 else queued + INGRESS_HEADROOM,
               "backpressure_config": _backpressure(), "ray_actor_options": {"num_cpus": 0}}
    return {MODEL_DEPLOYMENT: model, INGRESS_DEPLOYMENT: ingress}


def build_app(config: Config) -> serve.Application:
    """The application for ``config`` (paths already absolute, see ``safetydpo.cli.resolve_paths``).

    Keys are read here, from ``serve.api_key_env`` and ``serve.base_key_env`` of this process's
    environment, and travel as digests.
    """
    config = config.model_copy(deep=True)
    config.tracking.tracking_uri = tracking.resolve_tracking_uri(config)
    keys = {"api": digest(os.environ.get(config.serve.api_key_env)),
            "base": digest(os.environ.get(config.serve.base_key_env))}
    options = deployment_options(config)
    model = ImageModel.options(**options[MODEL_DEPLOYMENT]).bind(config)
    return Ingress.options(**options[INGRESS_DEPLOYMENT]).bind(model, config, keys)


class AppArgs(BaseModel):
    """Arguments of :func:`app_builder` (``serve run serve.app:app_builder key=value ...`` or config.yaml)."""

    config: str | None = None  # project YAML, relative to the project root; None: defaults
    overrides: list[str] = []  # key.sub=value
    lora: str | None = None  # the merged LoRA (file or folder)
    mlflow_model: str | None = None  # NAME@ALIAS or NAME/VERSION; wins over lora


def app_builder(args: AppArgs) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``."""
    path = cli.resolve_local(args.config) if args.config else None
    config = load_config(path, args.overrides)
    if args.lora:
        config.serve.lora_path = args.lora
    if args.mlflow_model:
        config.serve.mlflow_model = args.mlflow_model
    return build_app(cli.resolve_paths(config))
