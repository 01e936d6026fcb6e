"""The endpoint's boundary without a server: key rules, who may use which model, request snapping and
OpenAI's fields, the ingress's model index against a real MLflow registry, the replica's LoRA file cache."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from serve_testing import make_lora

from safetydpo import tracking
from safetydpo.config import ServeConfig, TrackingConfig, build_config
from safetydpo.model_ids import ModelCatalog, ModelUnavailable
from serve.access import MIN_KEY_CHARS, KeyPolicyError, Keys, needs_operator_key, public_registered_names
from serve.adapter_files import AdapterFiles
from serve.model_index import ModelIndex
from serve.schemas import Limits, request_model

API, OPERATOR = "a" * MIN_KEY_CHARS, "o" * MIN_KEY_CHARS


def _keys(host: str = "127.0.0.1", allow_anonymous: bool = False, **env: str) -> Keys:
    serve = ServeConfig(host=host, allow_anonymous=allow_anonymous)
    return Keys.from_environment(serve, {serve.api_key_env if k == "api" else serve.base_key_env: v
                                         for k, v in env.items()})


def test_keys_fail_closed() -> None:
    for env, words in (({"api": ""}, "set but empty"), ({"api": "  "}, "set but empty"),
                       ({"operator": "short"}, "5 characters"), ({"api": API, "operator": API}, "equals")):
        with pytest.raises(KeyPolicyError, match=words):
            _keys(**env)
    with pytest.raises(KeyPolicyError, match="refusing to serve anonymously"):
        _keys(host="0.0.0.0", operator=OPERATOR)
    with pytest.raises(KeyPolicyError, match="refusing to serve anonymously"):
        _keys(host="serve.example.org")
    assert _keys(host="0.0.0.0", allow_anonymous=True).api is None
    assert _keys(host="::1").api is None and _keys(host="localhost").operator is None
    keys = _keys(host="0.0.0.0", api=API, operator=OPERATOR)
    assert API not in (keys.api, keys.operator)  # digests only
    assert keys.opens_endpoint(API) and keys.opens_endpoint(OPERATOR) and not keys.opens_endpoint("x" * 40)
    assert not keys.opens_endpoint(None) and keys.is_operator(OPERATOR) and not keys.is_operator(API)


def test_only_the_deployed_aligned_models_are_public() -> None:
    public = public_registered_names(ServeConfig(mlflow_model="served@prod"), TrackingConfig(registered_model="reg"))
    assert public == {"served", "reg"}
    assert [m for m in ("merged", "champion", "base", "expert:hate", "expert:all", "mlflow:reg/3",
                        "mlflow:served/prod", "mlflow:other/champion") if needs_operator_key(m, public)] == [
        "base", "expert:hate", "expert:all", "mlflow:other/champion"]


def test_registered_names_that_cannot_travel_in_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="registered_model"):
        build_config({"tracking": {"registered_model": "safe lora\r\nX-Evil: 1"}})
    with pytest.raises(ValueError, match="mlflow_model"):
        build_config({"serve": {"mlflow_model": "naïve@champion"}})
    with pytest.raises(ValueError, match="letters, digits"):
        tracking.register_lora("run", "lora", "bad/name", "champion", {})


LIMITS = Limits(max_prompt_tokens=8, max_images=4, max_steps=50, max_guidance_scale=20.0, native_size=32,
                min_size=16, max_size=64, default_steps=20, default_guidance_scale=7.5, steps_grid=5,
                guidance_grid=0.5)


def _request(**body):
    return request_model(LIMITS, lambda text: len(text.split()) + 2).model_validate({"prompt": "a ball", **body})


def test_openai_fields_and_snapping() -> None:
    plain = _request()
    assert plain.response_format == "b64_json" and plain.ignored_fields == []
    sized = _request(size="40x24", user="user-1", quality="hd", style="vivid")
    assert (sized.width, sized.height) == (40, 24) and sized.ignored_fields == ["quality", "style"]
    snapped = LIMITS.snap(_request(width=37, height=61, num_inference_steps=23, guidance_scale=7.3))
    assert (snapped.width, snapped.height, snapped.num_inference_steps, snapped.guidance_scale) == (40, 64, 25, 7.5)
    assert LIMITS.snap(_request(num_inference_steps=3)).num_inference_steps == 3  # under the grid: kept
    assert LIMITS.snap(_request(num_inference_steps=49)).num_inference_steps == 50
    for bad in ({"size": "big"}, {"size": "32x32", "width": 48}, {"size": "8x8"}, {"response_format": "url"},
                {"n": "2"}, {"user": "u" * 300}):
        with pytest.raises(ValueError):
            _request(**bad)


@pytest.fixture
def registry(mlflow_store: str, tmp_path: Path) -> tuple[ModelCatalog, str, list[Path]]:
    """A registered model with two versions (different LoRAs), alias champion on version 2."""
    name = f"index-{tmp_path.name}"
    mlflow.set_tracking_uri(mlflow_store)
    experiment = mlflow.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    loras = []
    for seed in (1, 2):
        lora = make_lora(tmp_path / f"lora{seed}", seed=seed)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(lora.parent), "lora")
            mlflow.log_text("not a LoRA", "lora/README.txt")
        tracking.register_lora(run.info.run_id, "lora", name, "champion", {})
        loras.append(lora)
    catalog = ModelCatalog(str(tmp_path / "run"), tracking_uri=mlflow_store, registered_model=name)
    return catalog, name, loras


class CountingIndex(ModelIndex):
    """The ingress's index, counting its registry reads."""

    reads = 0

    def _registered(self, name: str) -> dict[str, str]:
        self.reads += 1
        return super()._registered(name)


def test_model_index_pins_aliases_and_answers_made_up_ids_from_memory(registry) -> None:
    catalog, name, _ = registry
    index = CountingIndex(catalog)
    assert index.adapter_id(f"mlflow:{name}/champion") == f"mlflow:{name}/2"
    assert index.adapter_id("champion") == f"mlflow:{name}/2"
    assert index.adapter_id(f"mlflow:{name}/1") == f"mlflow:{name}/1"
    for made_up in range(100, 150):
        with pytest.raises(ModelUnavailable) as missing:
            index.adapter_id(f"mlflow:{name}/{made_up}")
        assert "registry" in missing.value.public and catalog.run_root not in missing.value.public
    with pytest.raises(ModelUnavailable) as no_expert:
        index.adapter_id("expert:hate")
    assert catalog.run_root not in no_expert.value.public and catalog.run_root in str(no_expert.value)
    assert index.reads == 1  # one read of the name's versions and aliases served every lookup


def test_adapter_files_fetch_only_the_lora_per_version_under_a_byte_cap(registry) -> None:
    catalog, name, loras = registry
    size = loras[0].stat().st_size
    files = AdapterFiles(catalog, max_bytes=int(1.5 * size))
    v1, v2 = f"models:/{name}/1", f"models:/{name}@champion"
    try:
        first = files.acquire(v1)
        assert Path(first).read_bytes() == loras[0].read_bytes()
        assert files.bytes_on_disk() == size  # the LoRA only, not the README beside it
        files.release(first)
        assert files.acquire(v1) == first  # cached: the same file, no second fetch
        files.release(first)
        second = files.acquire(v2)
        assert Path(second).read_bytes() == loras[1].read_bytes()
        files.release(second)
        assert not Path(first).exists() and Path(second).exists()  # over the cap: the least recent went
        pinned = files.acquire(v1)
        files.release(files.acquire(v2))
        assert Path(pinned).exists()  # a load may be reading it: never deleted while pinned
        files.release(pinned)
        assert files.bytes_on_disk() <= files.max_bytes
    finally:
        files.close()
    assert not Path(files.root).exists()
