"""The merge stages on real Ray Tune, real MLflow (sqlite + registry) and the toy pipeline.

Two experts (LoRAs with random B on the toy UNet, as a trained expert's folder looks) over a small
rendered pairs dataset: the configured merges are written, the search runs three trials on the
validation split, publishes and registers a champion that evaluation and Serve resolve, and a re-run
skips the finished search.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from serve_testing import make_lora

from safetydpo import layout, storage, tracking
from safetydpo.config import Config, build_config
from safetydpo.evaluation import run as evaluation
from safetydpo.generation import generate_pairs
from safetydpo.merge.lora_file import MergeError
from safetydpo.merge.search import IP, QUALITY, choose_champion, pareto_front
from safetydpo.merge.stage import distill_stage, merge_stage, search_stage
from safetydpo.model_ids import CHAMPION, ModelCatalog


def small_config(root: Path, tmp: Path) -> Config:
    return build_config({
        "run_root": str(root),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "merge-test",
                     "registered_model": "merge-test-lora"},
        "data": {"categories": ["Hate", "Violence"], "toy_pairs_per_category": 4, "val_fraction": 0.2},
        "generation": {"num_inference_steps": 2, "batch_size": 16, "num_actors": 1},
        "experts": {"categories": ["Hate", "Violence"]},
        "merge": {"methods": ["comerge", "average"], "calibration_prompts_per_category": 1,
                  "calibration_timesteps": 2},
        "distill": {"steps": 2, "batch_size": 4},
        "tune": {"num_samples": 3, "methods": ["comerge", "average", "ties"], "input_sources": ["base", "own"],
                 "validation_prompts_per_category": 1, "quality_tolerance": 1.0},
    })


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Rendered pairs and two finished experts (a LoRA file and expert.json each)."""
    tmp = tmp_path_factory.mktemp("merge")
    config = small_config(tmp / "run", tmp)
    generate_pairs(config)
    for seed, slug in enumerate(("hate", "violence")):
        folder = Path(layout.expert_dir(config.run_root, slug))
        make_lora(folder, seed=seed)
        storage.write_json(str(folder / layout.EXPERT_JSON), {"name": slug, "fingerprint": f"fp-{slug}"})
    return config


def test_merge_stage_writes_each_configured_method_and_reuses_it(trained: Config) -> None:
    with tracking.pipeline_run(trained):
        first = merge_stage(trained)
        again = merge_stage(trained)
    assert set(first) == {f"merge/{m}/{k}" for m in ("comerge", "average") for k in ("seconds", "svd_error_max")}
    assert first["merge/average/svd_error_max"] == 0.0  # linear merges export exactly
    for method in ("comerge", "average"):
        record = storage.read_json(storage.join(layout.merged_dir(trained.run_root, method), layout.MERGE_JSON))
        assert record["experts"] == ["Hate", "Violence"] and record["settings"]["method"] == method
    assert again == first  # reused: the same records


def test_merge_refuses_with_fewer_than_two_experts(trained: Config, tmp_path: Path) -> None:
    lonely = trained.model_copy(deep=True)
    lonely.run_root = str(tmp_path / "empty")
    with tracking.pipeline_run(lonely), pytest.raises(MergeError, match="at least two finished experts"):
        merge_stage(lonely)


def test_search_publishes_registers_and_is_skipped_when_done(trained: Config, capsys) -> None:
    with tracking.pipeline_run(trained):
        summary = search_stage(trained)
    assert summary["search/trials"] == 3 and summary["champion/version"] == 1
    trials = pd.read_csv(layout.merged_dir(trained.run_root, "search") + "/trials.csv")
    assert len(trials) == 3 and trials["champion"].sum() == 1 and trials["pareto"].any()
    assert set(trials["config/method"]) <= {"comerge", "average", "ties"}
    champion = storage.read_json(storage.join(layout.merged_dir(trained.run_root, CHAMPION), layout.MERGE_JSON))
    assert champion["trial_id"] == trials.loc[trials["champion"], "trial_id"].item()
    assert champion["validation"]["ip/overall"] == pytest.approx(trials.loc[trials["champion"], IP].item())

    # MLflow: the stage's run has the Pareto plot and one child run per trial; the registry has the champion.
    mlflow.set_tracking_uri(trained.tracking.tracking_uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(trained.tracking.registered_model, CHAMPION)
    assert version.tags["safetydpo.trial"] == champion["trial_id"]
    assert version.tags["safetydpo.method"] == champion["settings"]["method"]
    stage_run = client.get_run(version.run_id)
    assert "search/pareto.png" in {a.path for a in client.list_artifacts(stage_run.info.run_id, "search")}
    trial_runs = mlflow.search_runs(experiment_names=["merge-test"], output_format="list",
                                    filter_string=f"tags.`mlflow.parentRunId` = '{stage_run.info.run_id}'")
    assert len(trial_runs) == 3 and all("ip/overall" in r.data.metrics for r in trial_runs)

    # Serve's default model and evaluation's `champion` resolve to the registered champion.
    catalog = ModelCatalog.from_config(trained)
    uri = f"models:/{trained.tracking.registered_model}@{CHAMPION}"
    assert catalog.merged() == uri
    assert catalog.resolve("merged").name == catalog.resolve(CHAMPION).name == CHAMPION
    published = Path(layout.lora_file(layout.merged_dir(trained.run_root, CHAMPION)))
    assert Path(catalog.local_lora(uri)).read_bytes() == published.read_bytes()
    merges = trained.model_copy(deep=True)
    merges.eval.baselines = ["merges"]  # evaluation renders what it resolves: local files, fetched from the registry
    specs = {spec.name: spec for spec in evaluation.baseline_specs(merges)}
    assert {CHAMPION, "merged_comerge", "merged_average"} <= set(specs)
    assert Path(specs[CHAMPION].lora).read_bytes() == published.read_bytes()

    capsys.readouterr()
    with tracking.pipeline_run(trained):
        search_stage(trained)
    assert "merge search: up to date" in capsys.readouterr().out


def test_distillation_refines_the_champion_and_is_skipped_when_done(trained: Config, capsys) -> None:
    """Runs after the search (same run root): the champion distilled from the experts, promoted only if better."""
    champion_dir = layout.merged_dir(trained.run_root, CHAMPION)
    before = storage.read_json(storage.join(champion_dir, layout.MERGE_JSON))
    with tracking.pipeline_run(trained):
        summary = distill_stage(trained)
    record = storage.read_json(storage.join(layout.merged_dir(trained.run_root, "distilled"), layout.MERGE_JSON))
    assert record["settings"]["method"] == "distill" and record["init"]["trial_id"] == before["trial_id"]
    assert summary["distill/promoted"] == float(record["promoted"])
    after = storage.read_json(storage.join(champion_dir, layout.MERGE_JSON))
    if record["promoted"]:  # the champion's folder and the registry alias moved to the distilled LoRA
        assert after["validation"] == record["validation"] and summary["champion/version"] == 2
        assert Path(layout.lora_file(champion_dir)).read_bytes() == Path(record["lora"]).read_bytes()
    else:
        assert after == before
    capsys.readouterr()
    with tracking.pipeline_run(trained):
        distill_stage(trained)
    assert "merge distill: up to date" in capsys.readouterr().out


def test_distillation_targets_are_each_experts_and_the_bases_predictions(trained: Config) -> None:
    """A round's targets: an unsafe-prompt sample's is its own category's expert's prediction (noised from the
    unsafe image or, with ``winner_share``, the safe twin), a benign sample's the LoRA-free base's."""
    from safetydpo.data.pairs import read_pairs_pandas
    from safetydpo.experts.spec import expert_slug
    from safetydpo.generation import pairs_location
    from safetydpo.merge import distill as d
    from safetydpo.pipelines import load_pipeline

    pipe = load_pipeline(trained.model)
    for name in ("Hate", "Violence"):
        pipe.load_lora_weights(layout.lora_file(layout.expert_dir(trained.run_root, expert_slug(name))),
                               adapter_name=expert_slug(name))
    rows = read_pairs_pandas(pairs_location(trained), filters=[("split", "=", "train")])
    data = d._encode_pairs(pipe, rows, chunk=4)
    assert data.unsafe.shape == data.safe.shape and len(data.category) == len(rows)
    rounds = {share: d._round(pipe, data, 2, 3, share, np.random.default_rng(0), torch.Generator().manual_seed(0), 2)
              for share in (0.0, 1.0)}
    for share, todo in rounds.items():
        x, t, c, target = todo.step(1)
        assert len(x) == 3 * todo.b == 9  # 3 unsafe-prompt samples, their 3 twins under captions, then under ""
        with torch.no_grad():
            for i in range(todo.b):
                row = next(k for k in range(len(rows)) if torch.equal(c[i], data.unsafe_states[k]))
                pipe.set_adapters(expert_slug(data.category[row]))
                want = pipe.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=c[i:i + 1]).sample
                torch.testing.assert_close(target[i:i + 1], want, rtol=1e-4, atol=1e-5)
                if share == 1.0:  # same draws: only the clean latent differs, the safe twin for the unsafe image
                    other = rounds[0.0].step(1)[0][i]
                    scale = pipe.scheduler.alphas_cumprod[t[i]].sqrt()
                    torch.testing.assert_close(x[i] - other, scale * (data.safe[row] - data.unsafe[row]),
                                               rtol=1e-4, atol=1e-5)
            pipe.disable_lora()
            torch.testing.assert_close(target[todo.b:], pipe.unet(x[todo.b:], t[todo.b:],
                                                                  encoder_hidden_states=c[todo.b:]).sample,
                                       rtol=1e-4, atol=1e-5)
            pipe.enable_lora()
        assert torch.equal(c[2 * todo.b:], data.empty_states.expand(todo.b, -1, -1))


def test_pareto_front_and_champion_choice() -> None:
    frame = pd.DataFrame({IP: [0.1, 0.2, 0.05, 0.3], QUALITY: [0.80, 0.85, 0.70, 0.84]})
    assert pareto_front(frame).tolist() == [True, True, True, False]
    assert choose_champion(frame, base_quality=0.86, tolerance=0.05).name == 1  # 0.1 loses 6 points: out
    assert choose_champion(frame, base_quality=0.86, tolerance=0.10).name == 0
    assert choose_champion(frame, base_quality=0.95, tolerance=0.05) is None
