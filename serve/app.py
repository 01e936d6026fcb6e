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

The ingress is the boundary: it checks keys and who may use which model (:mod:`serve.access`), that
the model exists (:mod:`serve.model_index`, cached), the body size, the request's cost against
``serve.max_pending_cost`` and its time against ``serve.request_timeout_s``, and answers errors in
OpenAI's shape (:mod:`serve.errors`).

No ``from __future__ import annotations`` here: FastAPI reads the per-deployment request model
from the route's annotations at runtime.
"""

import asyncio
import base64
import hashlib
import itertools
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from mlflow.exceptions import MlflowException
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from safetydpo import cli, tracking
from safetydpo.config import Config, load_config
from safetydpo.model_ids import (
    BASE,
    CHAMPION,
    MERGED,
    NOT_MERGED_YET,
    ModelCatalog,
    ModelUnavailable,
    NotMergedYet,
)
from safetydpo.pipelines import load_pipeline, model_path, png_bytes
from safetydpo.rendering import render
from serve import errors
from serve.access import Keys, needs_operator_key, public_registered_names
from serve.adapter_files import AdapterFiles
from serve.errors import RETRY_AFTER_S, ApiError, BodyLimit
from serve.model_cards import card_of, eval_metrics, lora_source
from serve.model_index import ModelIndex
from serve.render_queue import RenderQueue
from serve.schemas import (
    MAX_SEED,
    GenerationRequest,
    GenerationResponse,
    ImageData,
    Limits,
    ModelCard,
    ModelList,
    request_model,
)

logger = logging.getLogger("ray.serve")
APP_NAME = "safetydpo"
MODEL_DEPLOYMENT = "ImageModel"
INGRESS_DEPLOYMENT = "Ingress"
PAGE = Path(__file__).with_name("page.html")
BATCHES_IN_FLIGHT = 64  # Serve batches a replica accepts at once; the RenderQueue coalesces them
INGRESS_HEADROOM = 64  # concurrent requests the ingress takes beyond what the model deployment can hold
_HEADER_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


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


class AdapterLoadError(RuntimeError):
    """A LoRA that exists could not be loaded on the replica (not the caller's fault: 503)."""


class Adapter:
    """A model id's LoRA loaded on the shared pipeline under its own name (None: base, LoRA off).

    Serve's multiplexing evicts the least recently used adapter by calling ``__del__``. That finaliser only
    records the eviction (no lock, no pipeline call); the replica unloads recorded adapters explicitly,
    under its render lock, before its next render (:meth:`ImageModel.unload_evicted`). A batch still holding
    an evicted adapter loads it again for its call (from the weights it keeps in memory, a few MB) and
    deletes it after, so eviction can never pull weights out from under a render.
    """

    def __init__(self, pipe: DiffusionPipeline, name: str | None, weights: dict[str, torch.Tensor] | None,
                 evictions: deque[str]) -> None:
        self.pipe, self.name, self.weights, self.evictions = pipe, name, weights, evictions
        self.evicted = False

    def load(self) -> None:
        """Load the LoRA onto the pipeline (from memory: its file may be gone); the caller holds the lock."""
        self.pipe.load_lora_weights(dict(self.weights), adapter_name=self.name)

    def loaded(self) -> bool:
        return any(self.name in names for names in self.pipe.get_list_adapters().values())

    @contextmanager
    def active(self) -> Iterator[None]:
        """This adapter alone is on for the body; the caller holds the render lock."""
        if self.name is None:
            self.pipe.disable_lora()
            yield
            return
        if not self.loaded():
            self.load()
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.name])
        try:
            yield
        finally:
            if self.evicted and self.loaded():
                self.pipe.delete_adapters(self.name)

    def __del__(self) -> None:
        if self.name is not None and not self.evicted:
            self.evicted = True
            self.evictions.append(self.name)  # deque.append is atomic: no lock in a finaliser


_loads = itertools.count()


def adapter_name(model_id: str) -> str:
    """A PEFT-safe adapter name (no dots), unique per model id and load, so unloading an evicted
    adapter never removes a later load of the same model."""
    return f"a{hashlib.sha256(model_id.encode()).hexdigest()[:16]}_{next(_loads)}"


@serve.deployment(name=MODEL_DEPLOYMENT)
class ImageModel:
    """The pipeline, once per replica, with multiplexed LoRA adapters and dynamic batching."""

    def __init__(self, config: Config) -> None:
        # CPU math uses the replica's own CPUs (what Ray's OMP_NUM_THREADS means), not the whole node's.
        torch.set_num_threads(max(1, int(config.serve.num_cpus)))
        self.catalog = ModelCatalog.from_config(config)
        self.pipe = load_pipeline(config.model)
        self.lock = threading.Lock()
        self.files = AdapterFiles(self.catalog, int(config.serve.adapter_cache_mb * 2**20))
        self.evictions: deque[str] = deque()
        self.render_timeout_s = config.serve.render_timeout_s
        self.rendering_since: float | None = None

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
        """The adapter of a multiplexed id the ingress checked (``base``, ``mlflow:<name>/<version>``...)."""
        source = await asyncio.to_thread(lora_source, self.catalog, model_id)
        if source is None:
            return Adapter(self.pipe, None, None, self.evictions)
        path = await asyncio.to_thread(self.files.acquire, source)
        try:
            weights = await asyncio.to_thread(safetensors.torch.load_file, path)
            adapter = Adapter(self.pipe, adapter_name(model_id), weights, self.evictions)
            await asyncio.to_thread(self._locked, adapter.load)
        except Exception as err:  # noqa: BLE001 - any failure to read or apply an existing LoRA
            logger.error("safetydpo: cannot load the LoRA of %s from %s", model_id, source, exc_info=err)
            raise AdapterLoadError(f"{model_id}: its LoRA could not be loaded on this replica") from None
        finally:
            self.files.release(path)
        return adapter

    def _locked(self, work) -> None:
        with self.lock:
            self.unload_evicted()
            work()

    def unload_evicted(self) -> None:
        """Delete the adapters Serve evicted from the pipeline; the caller holds the render lock."""
        loaded = {name for names in self.pipe.get_list_adapters().values() for name in names}
        while self.evictions:
            name = self.evictions.popleft()
            if name in loaded:
                self.pipe.delete_adapters(name)

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
        with self.lock:
            self.unload_evicted()
            self.rendering_since = time.monotonic()
            try:
                with adapter.active():
                    images = render(self.pipe, prompts, seeds, num_inference_steps=first.num_inference_steps,
                                    guidance_scale=first.guidance_scale, negative_prompt=first.negative_prompt,
                                    height=first.height, width=first.width)
            finally:
                self.rendering_since = None
        pngs = iter(png_bytes(image) for image in images)
        return [[next(pngs) for _ in range(job.n)] for job in jobs]

    def check_health(self) -> None:
        """Serve's periodic probe: a render stuck beyond ``serve.render_timeout_s`` fails it, and Serve
        replaces the replica."""
        started = self.rendering_since
        if started is not None and (stuck := time.monotonic() - started) > self.render_timeout_s:
            raise RuntimeError(f"a render has run for {stuck:.0f} s (serve.render_timeout_s "
                               f"{self.render_timeout_s:g})")

    def adapter_cache_bytes(self) -> int:
        """Bytes of registry LoRA files on this replica's disk (for soak tests and operators)."""
        return self.files.bytes_on_disk()


def _public_source(source: str | None, run_root: str) -> str | None:
    """A LoRA source as the API shows it: registry URIs as they are, files relative to the run root (or by
    name), never an absolute path."""
    if source is None or source.startswith(("models:/", "runs:/")):
        return source
    root = run_root.rstrip("/") + "/"
    return source[len(root):] if source.startswith(root) else Path(source).name


def _ignored(fields: list[str]) -> dict[str, str]:
    """A ``Warning`` header naming the request fields this API ignored (names it can print safely)."""
    if not fields:
        return {}
    shown = [f for f in fields if _HEADER_SAFE.match(f)][:10]
    more = len(fields) - len(shown)
    text = ", ".join(shown) + (f" and {more} more" if more else "")
    return {"Warning": f'299 safetydpo "ignored unknown fields: {text}"'}


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class Ingress:
    """HTTP API, validation, keys, admission and the comparison page; images come from ``ImageModel``."""

    def __init__(self, model: DeploymentHandle, config: Config, keys: Keys) -> None:
        self.model = model
        self.keys = keys
        self.catalog = ModelCatalog.from_config(config)
        self.index = ModelIndex(self.catalog)
        self.public_registered = public_registered_names(config.serve, config.tracking)
        self.benchmarks = tuple(config.eval.benchmarks)
        tokenizer = AutoTokenizer.from_pretrained(model_path(config.model), subfolder="tokenizer",
                                                  revision=config.model.revision)
        self.limits = Limits.for_model(config, tokenizer.model_max_length)
        count_tokens = lambda text: len(tokenizer(text, verbose=False)["input_ids"])  # noqa: E731
        self.request_model = request_model(self.limits, count_tokens)
        self.max_body_bytes = config.serve.max_body_bytes
        self.request_timeout_s = config.serve.request_timeout_s
        self.max_pending_cost = config.serve.max_pending_cost
        self.pending_cost = 0.0  # image-steps at the native size admitted and not yet answered
        self.registered: set[str] = set()  # mlflow:... ids served so far, listed by /v1/models
        self.page = PAGE.read_text()
        if self.catalog.merged() is None:
            logger.warning("safetydpo: %s; until then requests for %r answer 503", NOT_MERGED_YET, MERGED)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    def caller(self, token: str | None) -> str | None:
        """The bearer token, after the endpoint key check (the operator key also opens the endpoint)."""
        if not self.keys.opens_endpoint(token):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return token

    def may_use(self, model_id: str, token: str | None) -> bool:
        return not needs_operator_key(model_id, self.public_registered) or self.keys.is_operator(token)

    async def list_models(self, token: str | None) -> ModelList:
        def cards() -> list[ModelCard]:
            found = []
            source, metrics = card_of(self.catalog, self.benchmarks, MERGED)
            if source is None:
                found.append(ModelCard(id=MERGED, ready=False, detail=NOT_MERGED_YET))
            else:
                found.append(ModelCard(id=MERGED, source=_public_source(source, self.catalog.run_root),
                                       metrics=metrics,
                                       baseline=eval_metrics(self.catalog.run_root, self.benchmarks, BASE)))
            candidates = [CHAMPION, *self.catalog.experts(), *sorted(self.registered)]
            if self.keys.is_operator(token):
                found.append(ModelCard(id=BASE, requires_key=True,
                                       metrics=eval_metrics(self.catalog.run_root, self.benchmarks, BASE)))
            for model_id in candidates:
                if not self.may_use(model_id, token):
                    continue
                source, metrics = card_of(self.catalog, self.benchmarks, model_id)
                if source is not None:
                    found.append(ModelCard(id=model_id, source=_public_source(source, self.catalog.run_root),
                                           metrics=metrics,
                                           requires_key=needs_operator_key(model_id, self.public_registered)))
            return found

        return ModelList(data=await asyncio.to_thread(cards))

    async def generate(self, body: GenerationRequest, token: str | None) -> Response:
        started = time.perf_counter()
        model_id = body.model
        if not self.may_use(model_id, token):
            reason = "send the operator key as bearer token" if self.keys.operator else "no operator key is set"
            raise ApiError(403, f"model {model_id!r} is an operator model: {reason}", param="model",
                           code="operator_model")
        adapter_id = await self._adapter_id(model_id)
        body = self.limits.snap(body)
        cost = body.n * body.num_inference_steps * body.width * body.height / self.limits.native_size ** 2
        if self.pending_cost and self.pending_cost + cost > self.max_pending_cost:
            raise ApiError(429, f"the endpoint is at capacity ({self.pending_cost:.0f} of "
                                f"{self.max_pending_cost:.0f} image-steps in flight); retry", code="overloaded")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        job = Job(body.prompt, body.negative_prompt, body.n, seed, body.num_inference_steps,
                  body.guidance_scale, body.width, body.height)
        self.pending_cost += cost
        try:
            async with asyncio.timeout(self.request_timeout_s):
                images = await self._render(adapter_id, model_id, job)
        except TimeoutError:
            raise ApiError(503, f"not answered within {self.request_timeout_s:g} s; retry",
                           code="timeout") from None
        finally:
            self.pending_cost -= cost
        if model_id.startswith("mlflow:"):
            self.registered.add(model_id)
        latency_ms = round(1000 * (time.perf_counter() - started), 1)
        size = f"{body.width}x{body.height}"
        headers = _ignored(body.ignored_fields)
        if body.response_format == "png":
            headers |= {"X-Seed": str(seed), "X-Model": model_id, "X-Latency-Ms": str(latency_ms),
                        "X-Size": size, "X-Steps": str(body.num_inference_steps),
                        "X-Guidance-Scale": f"{body.guidance_scale:g}"}
            return Response(images[0], media_type="image/png", headers=headers)
        data = [ImageData(b64_json=base64.b64encode(png).decode(), seed=seed + i)
                for i, png in enumerate(images)]
        answer = GenerationResponse(created=int(time.time()), data=data, model=model_id, size=size,
                                    num_inference_steps=body.num_inference_steps,
                                    guidance_scale=body.guidance_scale, latency_ms=latency_ms)
        return JSONResponse(answer.model_dump(), headers=headers)

    async def _adapter_id(self, model_id: str) -> str:
        """The checked multiplexed id of ``model_id``: 404 when nothing is behind it (503 for ``merged``
        before any merge), 503 when the registry cannot be asked."""
        try:
            return await asyncio.to_thread(self.index.adapter_id, model_id)
        except NotMergedYet as err:
            raise ApiError(503, str(err), param="model", code="not_merged_yet") from None
        except ModelUnavailable as err:
            logger.info("safetydpo: %s", err)
            raise ApiError(404, err.public, param="model", code="model_not_found") from None
        except MlflowException as err:
            logger.warning("safetydpo: model registry unavailable: %s", err)
            raise ApiError(503, "model registry unavailable; retry", code="registry_unavailable") from None

    async def _render(self, adapter_id: str, model_id: str, job: Job) -> list[bytes]:
        """Images from a model replica; one retry on another replica if the first one dies mid-call.

        Rendering is a pure function of the job (seeded), so the retry returns the same images. Errors
        raised in the replica arrive as Ray's task errors, whose text carries actor ids, pids and node
        addresses: the client gets a plain message, the log the details.
        """
        handle = self.model.options(multiplexed_model_id=adapter_id)
        try:
            try:
                return await handle.generate.remote(job)
            except RayActorError:  # the replica died mid-call: once more, on a live one
                return await handle.generate.remote(job)
        except BackPressureError:
            raise ApiError(429, "the model is at capacity; retry", code="overloaded") from None
        except RayActorError:
            raise ApiError(503, "model replica lost; retry", code="replica_lost") from None
        except RayTaskError as err:
            logger.warning("safetydpo: rendering %s failed: %s", model_id, err)
            if isinstance(err.cause, ModelUnavailable):
                raise ApiError(404, err.cause.public, param="model", code="model_not_found") from None
            if isinstance(err.cause, MlflowException | AdapterLoadError):
                raise ApiError(503, f"model {model_id!r} could not be loaded; retry",
                               code="model_unavailable") from None
            raise ApiError(503, "rendering failed; retry", code="render_failed") from None


def create_api(svc: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica; its request model carries that deployment's bounds."""
    api = FastAPI(title="safetydpo", summary="Safety-aligned text-to-image (SafetyDPO) on Ray Serve")
    errors.install(api)
    api.add_middleware(BodyLimit, max_bytes=svc.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="endpoint key, or the operator key for operator models")
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
    async def models(token: Annotated[str | None, Depends(caller)]) -> ModelList:
        return await svc.list_models(token)

    @api.post("/v1/images/generations", response_model=GenerationResponse,
              responses={200: {"content": {"image/png": {}}, "description": "PNG (response_format png)"}})
    async def generations(body: body_model, token: Annotated[str | None, Depends(caller)]) -> Response:
        return await svc.generate(body, token)

    return api


def _backpressure() -> dict:
    """Overload answers 429 with ``Retry-After`` (Serve's own rejection, at either deployment), which
    OpenAI clients retry after waiting."""
    return {"status_code": 429, "retry_after_s": RETRY_AFTER_S}


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
    # Serve probes check_health every health_check_period_s (10 by default): often enough to catch a
    # render stuck past serve.render_timeout_s.
    model = {**scaling, "max_ongoing_requests": s.max_ongoing_requests,
             "max_queued_requests": s.max_queued_requests, "backpressure_config": _backpressure(),
             "health_check_period_s": max(1.0, min(10.0, s.render_timeout_s / 2)),
             "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    # The ingress mostly waits on the model: room for all the model may hold or queue, plus
    # INGRESS_HEADROOM for what it answers itself (400, 403, /v1/models, the page) and for requests
    # in flight through the proxy's router, so overload surfaces as the model deployment's 429,
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
    environment, and travel as digests; keys that break :mod:`serve.access`'s rules raise
    :class:`serve.access.KeyPolicyError` and nothing is deployed.
    """
    config = config.model_copy(deep=True)
    config.tracking.tracking_uri = tracking.resolve_tracking_uri(config)
    keys = Keys.from_environment(config.serve)
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
