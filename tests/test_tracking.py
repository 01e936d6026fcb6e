"""safetydpo.tracking against a real sqlite MLflow store in tmp_path."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from safetydpo import tracking
from safetydpo.config import Config, build_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch) -> None:
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch) -> None:
    config = build_config({"run_root": str(tmp_path / "run")})
    assert tracking.resolve_tracking_uri(config) == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(config) == "http://127.0.0.1:5999"
    config.tracking.tracking_uri = "sqlite:///x.db"
    assert tracking.resolve_tracking_uri(config) == "sqlite:///x.db"


def test_remote_run_root_keeps_sqlite_in_the_project() -> None:
    config = build_config({"run_root": "s3://bucket/run"})
    assert tracking.resolve_tracking_uri(config).endswith("/runs/mlflow.db")


def test_parent_and_child_runs(tmp_config: Config, tmp_path: Path) -> None:
    with tracking.pipeline_run(tmp_config, run_name="pipe") as parent:
        with tracking.child_run("stage-a", tags={"safetydpo.category": "Hate"}) as child:
            tracking.log_metrics({"ip/overall": 0.25}, step=1)
        assert tracking.worker_env()[tracking.PARENT_ENV] == parent.info.run_id

    client = mlflow.MlflowClient()
    parent_run = client.get_run(parent.info.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["dpo.beta"] == "5000.0"
    config_yaml = Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "dl")))
    assert yaml.safe_load(config_yaml.read_text())["run_root"] == tmp_config.run_root
    # A local store keeps artifacts under the run root, not in ./mlruns.
    assert parent_run.info.artifact_uri.startswith((Path(tmp_config.run_root) / "mlartifacts").as_uri())

    child_run = client.get_run(child.info.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child_run.data.tags[tracking.STAGE_TAG] == "stage-a"
    assert child_run.data.tags["safetydpo.category"] == "Hate"
    assert child_run.data.metrics["ip/overall"] == 0.25


def test_rerun_reuses_the_child_and_env_parent_nests_separate_jobs(tmp_config: Config, monkeypatch) -> None:
    with tracking.pipeline_run(tmp_config) as parent, tracking.child_run("stage-a") as first:
        tracking.log_metrics({"loss": 1.0})

    # A stage launched later as its own job: no active run, parent named by the environment.
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    with tracking.pipeline_run(tmp_config) as resumed:
        assert resumed.info.run_id == parent.info.run_id
        with tracking.child_run("stage-a") as again:
            tracking.log_metrics({"loss": 0.5})
    with tracking.child_run("stage-b") as other:  # a worker: no active run, only the variable
        pass

    assert again.info.run_id == first.info.run_id
    assert tracking.find_child_run(parent.info.run_id, "stage-a").info.run_id == first.info.run_id
    assert tracking.find_child_run(parent.info.run_id, "stage-b").info.run_id == other.info.run_id
    assert tracking.find_child_run(parent.info.run_id, "stage-c") is None
    client = mlflow.MlflowClient()
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in children) == ["stage-a", "stage-b"]
    assert [m.value for m in client.get_metric_history(first.info.run_id, "loss")] == [1.0, 0.5]


def test_child_run_without_a_parent_says_so(tmp_config: Config) -> None:
    tracking.setup(tmp_config)
    with pytest.raises(RuntimeError, match=tracking.PARENT_ENV), tracking.child_run("orphan"):
        pass
