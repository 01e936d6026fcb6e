"""The comparison page at ``/`` in a real headless Chromium (type a prompt, submit, both images appear),
on an app deployed the way the pipeline deploys it: ``jobs/deploy.py``'s ``run``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from ray import serve
from serve_testing import HOST, PROMPT, free_port, make_lora, serve_config

from safetydpo import storage, tracking
from serve.deploy import deploy

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
BASE_KEY = "page-operator-key-" + "k" * 32


@dataclass
class Deployed:
    url: str
    summary: dict[str, float]
    parent_run_id: str


@pytest.fixture(scope="module")
def deployed(ray_local, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """Deployed by ``jobs/deploy.py``'s ``run`` as the pipeline does; base key set, no endpoint key."""
    root = tmp_path_factory.mktemp("serve-page") / "run"
    make_lora(root / "merged" / "comerge", seed=3)
    for model, ip in (("merged_comerge", 0.05), ("base", 0.9)):
        metrics = {"ip/overall": ip, "ip/hate": ip}
        storage.write_json(str(root / "eval" / model / "toy" / "metrics.json"), metrics)
    config = serve_config(root, mlflow_store, port=free_port())
    with pytest.MonkeyPatch.context() as env:
        env.delenv(config.serve.api_key_env, raising=False)
        env.setenv(config.serve.base_key_env, BASE_KEY)
        try:
            with tracking.pipeline_run(config) as parent:
                summary = deploy(config)
            yield Deployed(f"http://{HOST}:{config.serve.port}", summary, parent.info.run_id)
        finally:
            serve.shutdown()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _rendered(driver: webdriver.Chrome, image_id: str) -> bool:
    script = "const img = document.getElementById(arguments[0]); return img.complete && img.naturalWidth > 0;"
    return driver.execute_script(script, image_id)


def test_deploy_job_reports_and_logs_the_deployment(deployed: Deployed) -> None:
    assert deployed.summary["serve/replicas"] == 1.0 and deployed.summary["serve/deploy_s"] > 0
    child = tracking.find_child_run(deployed.parent_run_id, "deploy")
    assert child is not None and child.data.params["serve/url"] == deployed.url
    assert child.data.params["serve/merged"].endswith("merged/comerge/pytorch_lora_weights.safetensors")
    assert requests.get(f"{deployed.url}/healthz", timeout=30).json() == {"status": "ok"}


def test_page_shows_base_and_aligned_side_by_side(deployed: Deployed, browser: webdriver.Chrome) -> None:
    browser.get(deployed.url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.ID, "ip-table"))
    hate_row = browser.find_elements(By.CSS_SELECTOR, "#ip-table tr[data-category='hate'] td[data-model]")
    cells = {cell.get_attribute("data-model"): cell.text for cell in hate_row}
    assert cells == {"merged": "5.0 %", "base": "90.0 %"}

    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "key").send_keys(BASE_KEY)
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: _rendered(d, "aligned-image") and _rendered(d, "base-image"))
    aligned = browser.find_element(By.ID, "aligned-image").get_attribute("src")
    base = browser.find_element(By.ID, "base-image").get_attribute("src")
    assert aligned.startswith("data:image/png;base64,") and aligned != base
    assert browser.find_element(By.ID, "base-note").text == ""


def test_page_without_a_key_shows_aligned_only(deployed: Deployed, browser: webdriver.Chrome) -> None:
    browser.get(deployed.url)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "submit").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: _rendered(d, "aligned-image"))
    assert not _rendered(browser, "base-image")
    assert "base key" in browser.find_element(By.ID, "base-note").text
