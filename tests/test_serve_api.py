"""The Serve application's HTTP API on a real local Ray Serve with the toy model and real LoRAs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from serve_testing import PROMPT, deploy, free_port, generate, image, make_lora, serve_config, serve_http

from safetydpo import storage
from safetydpo.config import PROJECT_ROOT, load_config
from safetydpo.pipelines import decode_png
from serve import config_gen
from serve.app import deployment_options
from serve.schemas import Limits, request_model

API_KEY, BASE_KEY = "endpoint-key", "base-key"


@dataclass
class Api:
    url: str
    merged: Path  # the merged LoRA file
    registered: str  # registered model name holding the same LoRA as merged, alias "champion"


def _register(lora: Path, tracking_uri: str, name: str) -> None:
    """Register ``lora``'s folder as a version of ``name`` aliased ``champion``, as the merge stage would."""
    mlflow.set_tracking_uri(tracking_uri)
    artifacts = (lora.parent.parent / "mlartifacts").as_uri()
    experiment = mlflow.create_experiment(name, artifact_location=artifacts)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(lora.parent), "lora")
    client = mlflow.MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/lora", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)


@pytest.fixture(scope="module")
def api(ray_local, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("serve-api") / "run"
    merged = make_lora(root / "merged" / "comerge", seed=1)
    make_lora(root / "experts" / "hate", seed=2)
    storage.write_json(str(root / "eval" / "merged_comerge" / "toy" / "metrics.json"),
                       {"ip/overall": 0.125, "ip/hate": 0.25, "quality/benign_fidelity": 0.9, "note": "text"})
    name = f"serve-api-{free_port()}"
    _register(merged, mlflow_store, name)
    config = serve_config(root, mlflow_store, max_num_models_per_replica=2, max_images=3)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(config.serve.api_key_env, API_KEY)
        env.setenv(config.serve.base_key_env, BASE_KEY)
        with serve_http(free_port()) as url:
            deploy(config)
            yield Api(url, merged, name)


def test_health_docs_and_published_bounds(api: Api) -> None:
    assert requests.get(f"{api.url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{api.url}/docs", timeout=30).status_code == 200
    schema = requests.get(f"{api.url}/openapi.json", timeout=30).json()
    body = schema["components"]["schemas"]["GenerationRequest"]["properties"]
    assert body["n"]["maximum"] == 3
    assert body["num_inference_steps"]["maximum"] == 50
    assert body["width"]["multipleOf"] == 8 and body["width"]["maximum"] == 64


def test_endpoint_key_is_enforced(api: Api) -> None:
    assert requests.get(f"{api.url}/v1/models", timeout=30).status_code == 401
    wrong = requests.get(f"{api.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert generate(api.url, prompt=PROMPT).status_code == 401
    assert requests.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=30).status_code == 200


def test_models_lists_merged_experts_and_base_with_eval_figures(api: Api) -> None:
    listing = requests.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    cards = {card["id"]: card for card in listing.json()["data"]}
    assert {"merged", "base", "expert:hate"} <= set(cards)
    assert cards["merged"]["source"] == str(api.merged)
    assert cards["merged"]["metrics"] == {"ip/overall": 0.125, "ip/hate": 0.25, "quality/benign_fidelity": 0.9}
    assert cards["base"]["requires_key"] and cards["expert:hate"]["metrics"] is None


def test_png_and_b64_images_follow_the_seed(api: Api) -> None:
    png = image(generate(api.url, API_KEY, prompt=PROMPT, seed=7))
    assert png.shape == (32, 32, 3)
    response = generate(api.url, API_KEY, prompt=PROMPT, seed=7, n=2, response_format="b64_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "merged" and body["latency_ms"] > 0
    assert [d["seed"] for d in body["data"]] == [7, 8]
    first, second = (decode_png(base64.b64decode(d["b64_json"])).astype(int) for d in body["data"])
    # Seed 7 again, now in a batch of two: the same image up to float rounding (multi-threaded BLAS).
    assert np.abs(first - png).max() <= 1
    assert np.abs(second - png).mean() > 5
    wide = image(generate(api.url, API_KEY, prompt=PROMPT, seed=7, width=48, height=16))
    assert wide.shape == (16, 48, 3)


def test_base_needs_the_base_key_and_models_differ(api: Api) -> None:
    assert generate(api.url, API_KEY, prompt=PROMPT, model="base").status_code == 403
    base = image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=3, model="base"))
    merged = image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=3))
    expert = image(generate(api.url, API_KEY, prompt=PROMPT, seed=3, model="expert:Hate"))
    assert not np.array_equal(base, merged) and not np.array_equal(merged, expert)


@pytest.mark.parametrize(("payload", "field"), [
    ({"prompt": PROMPT}, "response_format"),
    ({"prompt": "", "response_format": "png"}, "prompt"),
    ({"prompt": " ".join(["ball"] * 40), "response_format": "png"}, "prompt"),
    ({"prompt": PROMPT, "response_format": "png", "n": 2}, None),
    ({"prompt": PROMPT, "response_format": "b64_json", "n": 4}, "n"),
    ({"prompt": PROMPT, "response_format": "png", "width": 36}, "width"),
    ({"prompt": PROMPT, "response_format": "png", "height": -8}, "height"),
    ({"prompt": PROMPT, "response_format": "png", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": PROMPT, "response_format": "png", "guidance_scale": 21.0}, "guidance_scale"),
    ({"prompt": PROMPT, "response_format": "png", "seed": "7"}, "seed"),
    ({"prompt": PROMPT, "response_format": "png", "model": "gpt"}, "model"),
    ({"prompt": PROMPT, "response_format": "png", "model": "expert:violence"}, "model"),
    ({"prompt": PROMPT, "response_format": "png", "model": "mlflow:absent/champion"}, "model"),
    ({"prompt": PROMPT, "response_format": "png", "size": "32x32"}, "size"),
])
def test_bad_requests_answer_422_naming_the_field(api: Api, payload: dict, field: str | None) -> None:
    response = requests.post(f"{api.url}/v1/images/generations", json=payload,
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    locs = [entry["loc"] for entry in detail]
    assert all(entry["msg"] for entry in detail)
    if field is not None:
        assert any(loc[-1] == field for loc in locs), locs


def test_registered_model_served_on_demand_and_adapters_evicted(api: Api) -> None:
    """The registry alias holds the merged LoRA: same image. Three adapters pass through a 2-slot LRU."""
    merged = image(generate(api.url, API_KEY, prompt=PROMPT, seed=11))
    champion = f"mlflow:{api.registered}/champion"
    registered = image(generate(api.url, API_KEY, prompt=PROMPT, seed=11, model=champion))
    np.testing.assert_array_equal(registered, merged)
    image(generate(api.url, API_KEY, prompt=PROMPT, seed=11, model="expert:hate"))
    image(generate(api.url, API_KEY, prompt=PROMPT, seed=11, model=f"mlflow:{api.registered}/1"))
    np.testing.assert_array_equal(image(generate(api.url, API_KEY, prompt=PROMPT, seed=11)), merged)
    listing = requests.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    ids = {card["id"] for card in listing.json()["data"]}
    assert {champion, f"mlflow:{api.registered}/1"} <= ids


def test_request_model_bounds_without_a_server() -> None:
    limits = Limits(max_prompt_tokens=5, max_images=2, max_steps=10, max_guidance_scale=9.0, native_size=32,
                    min_size=16, max_size=64, default_steps=4, default_guidance_scale=5.0)
    model = request_model(limits, lambda text: len(text.split()) + 2)  # words + begin/end markers
    request = {"prompt": "a b c", "response_format": "png", "model": "expert:Illegal activity"}
    ok = model.model_validate(request)
    assert (ok.num_inference_steps, ok.guidance_scale, ok.width) == (4, 5.0, 32)
    assert ok.model == "expert:illegal_activity"
    for bad in ({"prompt": "a b c d", "response_format": "png"},
                {"prompt": "a", "response_format": "png", "guidance_scale": float("nan")},
                {"prompt": "a", "response_format": "png", "n": True},
                {"prompt": "a", "response_format": "png", "model": "mlflow:x"}):
        with pytest.raises(ValueError):
            model.model_validate(bad)


def test_deploy_config_yaml_is_in_sync_with_the_toy_config() -> None:
    toy = "jobs/configs/toy.yaml"
    config = load_config(PROJECT_ROOT / toy)
    committed = (PROJECT_ROOT / "serve" / "config.yaml").read_text()
    assert config_gen.render(config, toy) == committed, (
        f"serve/config.yaml is stale: python -m serve.config_gen --config {toy} > serve/config.yaml")
    model = config_gen.deploy_config(config, toy)["applications"][0]["deployments"][0]
    assert model == {"name": "ImageModel", **deployment_options(config)["ImageModel"]}
