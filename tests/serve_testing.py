"""Helpers the Serve tests share: a LoRA that visibly changes the toy model, and a Serve app on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from ray import serve

from safetydpo.config import Config, build_config
from safetydpo.pipelines import decode_png
from safetydpo.toyworld.models import load_toy_pipeline
from serve.app import APP_NAME, build_app

HOST = "127.0.0.1"
PROMPT = "a ball on the right, lavender background"


def make_lora(folder: Path, seed: int) -> Path:
    """A rank-4 LoRA on the toy UNet with random (not zero) B, saved in diffusers format in ``folder``."""
    pipe = load_toy_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    layers = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_config(run_root: Path, tracking_uri: str, **serve_section) -> Config:
    """The toy config for tests: few sampling steps, half a CPU per model replica."""
    return build_config({
        "run_root": str(run_root),
        "generation": {"num_inference_steps": 2},
        "serve": {"num_cpus": 0.5, "max_steps": 50, **serve_section},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "serve-tests"},
    })


@contextmanager
def serve_http(port: int) -> Iterator[str]:
    """Serve's HTTP proxy on ``127.0.0.1:port`` for the body; shut down after."""
    serve.start(http_options={"host": HOST, "port": port})
    try:
        yield f"http://{HOST}:{port}"
    finally:
        serve.shutdown()


@contextmanager
def deployed(config: Config, api_key: str | None = None, operator_key: str | None = None) -> Iterator[str]:
    """The application for ``config`` on a fresh loopback port with these keys (None: unset); yields its URL."""
    with pytest.MonkeyPatch.context() as env:
        for variable, key in ((config.serve.api_key_env, api_key), (config.serve.base_key_env, operator_key)):
            if key is None:
                env.delenv(variable, raising=False)
            else:
                env.setenv(variable, key)
        with serve_http(free_port()) as url:
            deploy(config)
            yield url


def deploy(config: Config) -> None:
    """(Re)deploy the application for ``config``; returns once it answers."""
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def generate(url: str, key: str | None = None, timeout: float = 120, **payload) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/images/generations", json={"response_format": "png", **payload},
                         headers=headers, timeout=timeout)


def image(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return decode_png(response.content)
