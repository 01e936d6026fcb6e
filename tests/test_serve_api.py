"""The Serve application's HTTP API on a real local Ray Serve with the toy model and real LoRAs."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import openai
import pytest
import requests
from ray import serve
from serve_testing import PROMPT, deployed, free_port, generate, image, make_lora, serve_config

from safetydpo import storage
from safetydpo.config import PROJECT_ROOT, load_config
from safetydpo.pipelines import decode_png
from serve import config_gen
from serve.app import APP_NAME, MODEL_DEPLOYMENT, deployment_options
from serve.schemas import Limits, request_model

API_KEY, BASE_KEY = "endpoint-key-" + "e" * 32, "operator-key-" + "o" * 32


@dataclass
class Api:
    url: str
    merged: Path  # the merged LoRA file
    registered: str  # the configured registered model, holding the same LoRA as merged, alias "champion"
    other: str  # another registered model: an operator model


def _register(lora: Path, tracking_uri: str, name: str) -> None:
    """Register ``lora``'s folder as a version of ``name`` aliased ``champion``, as the merge stage would."""
    mlflow.set_tracking_uri(tracking_uri)
    artifacts = (lora.parent.parent / f"mlartifacts-{name}").as_uri()
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
    name, other = f"serve-api-{free_port()}", f"other-{free_port()}"
    _register(merged, mlflow_store, name)
    _register(make_lora(root / "other", seed=3), mlflow_store, other)
    config = serve_config(root, mlflow_store, max_num_models_per_replica=2, max_images=3)
    config.tracking.registered_model = name  # its champion is public; merged stays the run root's file
    config.serve.lora_path = str(merged)
    with deployed(config, API_KEY, BASE_KEY) as url:
        yield Api(url, merged, name, other)


def _models(api: Api, key: str) -> dict[str, dict]:
    listing = requests.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert listing.status_code == 200, listing.text
    return {card["id"]: card for card in listing.json()["data"]}


def test_health_docs_and_published_bounds(api: Api) -> None:
    assert requests.get(f"{api.url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{api.url}/docs", timeout=30).status_code == 200
    schema = requests.get(f"{api.url}/openapi.json", timeout=30).json()
    body = schema["components"]["schemas"]["GenerationRequest"]["properties"]
    assert body["n"]["maximum"] == 3
    assert body["num_inference_steps"]["maximum"] == 50
    assert body["width"]["maximum"] == 64 and body["response_format"]["default"] == "b64_json"


def test_endpoint_key_is_enforced(api: Api) -> None:
    assert requests.get(f"{api.url}/v1/models", timeout=30).status_code == 401
    wrong = requests.get(f"{api.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert generate(api.url, prompt=PROMPT).status_code == 401
    assert requests.get(f"{api.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=30).status_code == 200


def test_models_lists_what_the_caller_may_use_with_eval_figures(api: Api) -> None:
    public = _models(api, API_KEY)
    assert set(public) == {"merged", "champion"}
    assert public["merged"]["source"] == "merged/comerge/pytorch_lora_weights.safetensors"  # no absolute path
    assert public["merged"]["metrics"] == {"ip/overall": 0.125, "ip/hate": 0.25, "quality/benign_fidelity": 0.9}
    assert public["champion"]["source"] == f"models:/{api.registered}@champion"
    operator = _models(api, BASE_KEY)
    assert {"merged", "champion", "base", "expert:hate"} <= set(operator)
    assert operator["base"]["requires_key"] and operator["expert:hate"]["requires_key"]
    assert operator["expert:hate"]["metrics"] is None


def test_png_and_b64_images_follow_the_seed(api: Api) -> None:
    png = image(generate(api.url, API_KEY, prompt=PROMPT, seed=7))
    assert png.shape == (32, 32, 3)
    response = generate(api.url, API_KEY, prompt=PROMPT, seed=7, n=2, response_format="b64_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "merged" and body["latency_ms"] > 0 and body["size"] == "32x32"
    assert abs(body["created"] - time.time()) < 300
    assert [d["seed"] for d in body["data"]] == [7, 8]
    first, second = (decode_png(base64.b64decode(d["b64_json"])).astype(int) for d in body["data"])
    # Seed 7 again, now in a batch of two: the same image up to float rounding (multi-threaded BLAS).
    assert np.abs(first - png).max() <= 1
    assert np.abs(second - png).mean() > 5
    wide = image(generate(api.url, API_KEY, prompt=PROMPT, seed=7, width=48, height=16))
    assert wide.shape == (16, 48, 3)


def test_operator_models_need_the_operator_key_and_models_differ(api: Api) -> None:
    for model in ("base", "expert:Hate", f"mlflow:{api.other}/champion", "mlflow:ghost/1", "expert:violence"):
        refused = generate(api.url, API_KEY, prompt=PROMPT, model=model)
        assert refused.status_code == 403, (model, refused.text)  # refused before any lookup: no existence leak
        assert refused.json()["error"]["param"] == "model"
    base = image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=3, model="base"))
    merged = image(generate(api.url, API_KEY, prompt=PROMPT, seed=3))
    expert = image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=3, model="expert:Hate"))
    other = image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=3, model=f"mlflow:{api.other}/champion"))
    assert not np.array_equal(base, merged) and not np.array_equal(merged, expert)
    assert not np.array_equal(other, merged)
    np.testing.assert_array_equal(image(generate(api.url, API_KEY, prompt=PROMPT, seed=3, model="champion")),
                                  merged)


def test_unknown_fields_are_ignored_with_a_warning_and_settings_snap_to_the_grid(api: Api) -> None:
    response = generate(api.url, API_KEY, prompt=PROMPT, seed=5, quality="hd", style="vivid",
                        num_inference_steps=7, guidance_scale=7.3, width=37, response_format="b64_json")
    assert response.status_code == 200, response.text
    assert response.headers["Warning"] == '299 safetydpo "ignored unknown fields: quality, style"'
    body = response.json()
    assert (body["size"], body["num_inference_steps"], body["guidance_scale"]) == ("40x32", 5, 7.5)
    same = generate(api.url, API_KEY, prompt=PROMPT, seed=5, num_inference_steps=5, guidance_scale=7.5,
                    size="40x32", response_format="b64_json").json()
    assert same["data"][0]["b64_json"] == body["data"][0]["b64_json"]


def test_bodies_over_the_limit_answer_413_before_parsing(api: Api) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    declared = requests.post(f"{api.url}/v1/images/generations", data=big, headers=headers, timeout=30)
    assert declared.status_code == 413 and declared.json()["error"]["type"] == "invalid_request_error"
    chunked = requests.post(f"{api.url}/v1/images/generations", data=iter([big[:40_000], big[40_000:]]),
                            headers=headers, timeout=30)  # no Content-Length: counted as it streams
    assert chunked.status_code == 413, chunked.text


def test_the_official_openai_client(api: Api) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    result = client.images.generate(prompt=PROMPT, model="merged", n=2, size="32x32", user="tester",
                                    quality="hd", response_format="b64_json")
    assert result.created > 0 and len(result.data) == 2
    pngs = [decode_png(base64.b64decode(d.b64_json)) for d in result.data]
    assert pngs[0].shape == (32, 32, 3) and not np.array_equal(pngs[0], pngs[1])
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(prompt=PROMPT, model="base")
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt=PROMPT, n=9)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key=BASE_KEY, max_retries=0).images.generate(
            prompt=PROMPT, model="expert:violence")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong-" * 8, max_retries=0).images.generate(prompt=PROMPT)


@pytest.mark.parametrize(("payload", "field"), [
    ({"prompt": PROMPT, "response_format": "url"}, "response_format"),
    ({"prompt": "", "response_format": "png"}, "prompt"),
    ({"prompt": " ".join(["ball"] * 40), "response_format": "png"}, "prompt"),
    ({"prompt": PROMPT, "response_format": "png", "n": 2}, None),
    ({"prompt": PROMPT, "response_format": "b64_json", "n": 4}, "n"),
    ({"prompt": PROMPT, "response_format": "png", "width": 72}, "width"),
    ({"prompt": PROMPT, "response_format": "png", "height": -8}, "height"),
    ({"prompt": PROMPT, "response_format": "png", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": PROMPT, "response_format": "png", "guidance_scale": 21.0}, "guidance_scale"),
    ({"prompt": PROMPT, "response_format": "png", "seed": "7"}, "seed"),
    ({"prompt": PROMPT, "response_format": "png", "model": "gpt"}, "model"),
    ({"prompt": PROMPT, "response_format": "png", "model": "mlflow:a/b/c"}, "model"),
    ({"prompt": PROMPT, "response_format": "png", "size": "32 x 32"}, "size"),
    ({"prompt": PROMPT, "response_format": "png", "user": "u" * 257}, "user"),
])
def test_bad_requests_answer_400_naming_the_field(api: Api, payload: dict, field: str | None) -> None:
    response = requests.post(f"{api.url}/v1/images/generations", json=payload,
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == field


@pytest.mark.parametrize("model", ["expert:violence", "mlflow:absent/champion", f"mlflow:{'x' * 20}/9"])
def test_missing_operator_models_answer_404_without_paths(api: Api, model: str) -> None:
    response = generate(api.url, BASE_KEY, prompt=PROMPT, model=model)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert str(api.merged.parent.parent.parent) not in response.text  # the run root


def test_registered_model_served_on_demand_and_adapters_evicted(api: Api) -> None:
    """The registry alias holds the merged LoRA: same image. Four adapters pass through a 2-slot LRU; the
    replica keeps only the registry's LoRA files (not their artifact trees), one per version."""
    merged = image(generate(api.url, API_KEY, prompt=PROMPT, seed=11))
    champion = f"mlflow:{api.registered}/champion"
    registered = image(generate(api.url, API_KEY, prompt=PROMPT, seed=11, model=champion))
    np.testing.assert_array_equal(registered, merged)
    image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=11, model="expert:hate"))
    image(generate(api.url, BASE_KEY, prompt=PROMPT, seed=11, model=f"mlflow:{api.other}/1"))
    np.testing.assert_array_equal(image(generate(api.url, API_KEY, prompt=PROMPT, seed=11,
                                                 model=f"mlflow:{api.registered}/1")), merged)
    np.testing.assert_array_equal(image(generate(api.url, API_KEY, prompt=PROMPT, seed=11)), merged)
    assert {champion, f"mlflow:{api.registered}/1"} <= set(_models(api, API_KEY))
    assert f"mlflow:{api.other}/1" in _models(api, BASE_KEY) and f"mlflow:{api.other}/1" not in _models(
        api, API_KEY)
    replica = serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME)
    cached = replica.adapter_cache_bytes.remote().result()
    assert cached == 2 * api.merged.stat().st_size  # two registered versions, the LoRA file of each


def test_request_model_bounds_without_a_server() -> None:
    limits = Limits(max_prompt_tokens=5, max_images=2, max_steps=10, max_guidance_scale=9.0, native_size=32,
                    min_size=16, max_size=64, default_steps=4, default_guidance_scale=5.0)
    model = request_model(limits, lambda text: len(text.split()) + 2)  # words + begin/end markers
    request = {"prompt": "a b c", "response_format": "png", "model": "expert:Illegal activity"}
    ok = model.model_validate(request)
    assert (ok.num_inference_steps, ok.guidance_scale, ok.width) == (4, 5.0, 32)
    assert model.model_validate({"prompt": "a", "model": "champion"}).model == "champion"
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
