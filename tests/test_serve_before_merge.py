"""Serve on a fresh run root, before any merge: it starts, says plainly that no merged model exists
yet and what to run, answers 503 for the default model, and leaks no Ray internals in any body."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests
from serve_testing import PROMPT, deploy, free_port, generate, image, make_lora, serve_config, serve_http

BASE_KEY = "fresh-base-key"
INTERNALS = re.compile(r"ActorID|actor_id|pid=|ip=|Traceback|ray::", re.IGNORECASE)


@pytest.fixture(scope="module")
def fresh(ray_local, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve-fresh") / "run"
    make_lora(root / "experts" / "hate", seed=4)  # experts trained, nothing merged yet
    config = serve_config(root, mlflow_store)
    with pytest.MonkeyPatch.context() as env:
        env.delenv(config.serve.api_key_env, raising=False)
        env.setenv(config.serve.base_key_env, BASE_KEY)
        with serve_http(free_port()) as url:
            deploy(config)
            yield url


def test_models_list_says_merged_is_not_ready_and_what_to_run(fresh: str) -> None:
    cards = {c["id"]: c for c in requests.get(f"{fresh}/v1/models", timeout=30).json()["data"]}
    assert cards["merged"]["ready"] is False and cards["merged"]["source"] is None
    assert "jobs/pipeline.py" in cards["merged"]["detail"] and "serve.lora_path" in cards["merged"]["detail"]
    assert cards["expert:hate"]["ready"] is True


def test_default_model_answers_503_with_what_to_run_and_no_internals(fresh: str) -> None:
    response = generate(fresh, prompt=PROMPT)
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert detail.startswith("no merged safety LoRA yet: run the pipeline (jobs/pipeline.py)")
    assert not INTERNALS.search(response.text), response.text


def test_other_models_still_serve_and_missing_ones_answer_422_without_internals(fresh: str) -> None:
    image(generate(fresh, BASE_KEY, prompt=PROMPT, model="base"))
    image(generate(fresh, prompt=PROMPT, model="expert:hate"))
    missing = generate(fresh, prompt=PROMPT, model="expert:violence")
    assert missing.status_code == 422, missing.text
    assert "no trained expert 'Violence'" in missing.json()["detail"][0]["msg"]
    assert not INTERNALS.search(missing.text), missing.text
