"""Serve on a fresh run root, before any merge: it starts, says plainly that no merged model exists
yet and what to run, answers 503 for the default model, and leaks no Ray internals in any body."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests
from serve_testing import PROMPT, deployed, generate, image, make_lora, serve_config

BASE_KEY = "fresh-operator-key-" + "k" * 32
INTERNALS = re.compile(r"ActorID|actor_id|pid=|ip=|Traceback|ray::", re.IGNORECASE)


@pytest.fixture(scope="module")
def fresh(ray_local, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve-fresh") / "run"
    make_lora(root / "experts" / "hate", seed=4)  # experts trained, nothing merged yet
    config = serve_config(root, mlflow_store)
    with deployed(config, operator_key=BASE_KEY) as url:
        yield url


def test_models_list_says_merged_is_not_ready_and_what_to_run(fresh: str) -> None:
    cards = {c["id"]: c for c in requests.get(f"{fresh}/v1/models", timeout=30).json()["data"]}
    assert set(cards) == {"merged"}  # no key: the aligned model only
    assert cards["merged"]["ready"] is False and cards["merged"]["source"] is None
    assert "jobs/pipeline.py" in cards["merged"]["detail"] and "serve.lora_path" in cards["merged"]["detail"]
    operator = requests.get(f"{fresh}/v1/models", headers={"Authorization": f"Bearer {BASE_KEY}"}, timeout=30)
    assert {c["id"]: c for c in operator.json()["data"]}["expert:hate"]["ready"] is True


def test_default_model_answers_503_with_what_to_run_and_no_internals(fresh: str) -> None:
    response = generate(fresh, prompt=PROMPT)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    message = response.json()["error"]["message"]
    assert message.startswith("no merged safety LoRA yet: run the pipeline (jobs/pipeline.py)")
    assert not INTERNALS.search(response.text), response.text


def test_other_models_still_serve_and_missing_ones_answer_404_without_internals(fresh: str) -> None:
    image(generate(fresh, BASE_KEY, prompt=PROMPT, model="base"))
    image(generate(fresh, BASE_KEY, prompt=PROMPT, model="expert:hate"))
    assert generate(fresh, prompt=PROMPT, model="expert:hate").status_code == 403  # an operator model
    missing = generate(fresh, BASE_KEY, prompt=PROMPT, model="expert:violence")
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["message"] == "no trained expert 'Violence': run the experts stage " \
                                                 "(jobs/train_experts.py)"
    assert not INTERNALS.search(missing.text), missing.text
