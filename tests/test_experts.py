"""Safety experts on real Ray Train + Tune, real MLflow (sqlite) and the toy pipeline.

One run trains two experts side by side: Hate trains normally, Violence is given a learning rate
so large that its second step overflows, which must stop Violence alone with an error naming the
step, keep its step-1 checkpoint and let Hate finish. The re-run skips Hate and resumes Violence.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safetydpo import experts, layout, storage, tracking
from safetydpo.config import Config, DPOConfig, build_config
from safetydpo.data.pairs import MANIFEST, dataset_files
from safetydpo.experts import probe
from safetydpo.experts.batches import LatentCache, dpo_inputs, step_inputs
from safetydpo.experts.data import scan_pairs
from safetydpo.experts.probe import PAIR_COLUMNS
from safetydpo.experts.spec import is_finished
from safetydpo.generation import generate_pairs
from safetydpo.lora import add_lora, load_lora_state, lora_state
from safetydpo.pipelines import load_pipeline
from safetydpo.toyworld.models import load_toy_pipeline

CATEGORIES = ["Hate", "Violence"]
MAX_STEPS = 3


def make_config(root: Path, store: str, **experts_overrides) -> Config:
    """Two categories of 4 train + 1 validation toy pairs; 2-step rendering; a tiny DPO run."""
    return build_config({
        "run_root": str(root),
        "tracking": {"tracking_uri": store, "experiment": f"experts-{root.name}"},
        "data": {"categories": CATEGORIES, "toy_pairs_per_category": 4, "val_fraction": 0.2},
        "generation": {"num_inference_steps": 2, "num_cpus_per_actor": 0.5},
        "dpo": {"max_steps": MAX_STEPS, "batch_size": 2, "learning_rate": 1e-3,
                "anchor_weight": 1.0, "preserve_weight": 1.0},
        "experts": {"categories": CATEGORIES, "cpus_per_worker": 0.5, "checkpoint_every": 1,
                    "max_concurrent": 2, "max_failures": 1,
                    "dpo_overrides": {"Violence": {"learning_rate": 1e30}}} | experts_overrides,
    })


@pytest.fixture(scope="module")
def pairs(ray_local, mlflow_store, tmp_path_factory) -> str:
    """The generation stage's pairs dataset (toy pipeline renders both prompts of every pair)."""
    return generate_pairs(make_config(tmp_path_factory.mktemp("gen"), mlflow_store))


# -- pairs data checks (no Ray) ----------------------------------------------------------------------

def _rows(pairs: str) -> list[dict]:
    return pa.concat_tables(pq.read_table(f) for f in dataset_files(pairs)[1]).to_pylist()


def _rewrite(pairs: str, folder: Path, change) -> str:
    """A finished dataset (one shard + manifest) holding ``change`` of the rows of ``pairs``."""
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(change(_rows(pairs))), folder / "shard-00000.parquet")
    storage.write_json(str(folder / MANIFEST), {"files": ["shard-00000.parquet"]})
    return str(folder)


def test_scan_pairs_describes_experts(pairs):
    specs = scan_pairs(pairs, ["Hate", "all"], all_categories=tuple(CATEGORIES))
    assert specs["Hate"].num_pairs == 4 and specs["Hate"].categories == ("Hate",)
    assert specs["all"].num_pairs == 8 and specs["all"].categories == tuple(CATEGORIES)
    validation = [r["unsafe_prompt"] for r in _rows(pairs) if r["split"] == "validation"]
    assert list(specs["Hate"].preview_prompts) == validation[:1]  # previews come from validation
    assert list(specs["all"].preview_prompts) == validation
    again = scan_pairs(pairs, ["Hate", "Violence"])
    assert again["Hate"].data_hash == specs["Hate"].data_hash != again["Violence"].data_hash
    # every expert preserves the safe twins of every category: one benign hash, the data_hash of "all"
    assert again["Hate"].benign_hash == again["Violence"].benign_hash == specs["all"].data_hash


def test_scan_pairs_rejects_bad_data(pairs, tmp_path):
    def drop_image(rows):
        rows[2]["safe_image"] = None
        return rows

    bad = _rewrite(pairs, tmp_path / "missing", drop_image)
    with pytest.raises(experts.ExpertError,
                       match=r"row 3 \(pair_id 'toy-train-hate-00002'\): safe_image missing"):
        scan_pairs(bad, ["Hate"])

    with pytest.raises(experts.ExpertError, match=r"expert 'Sexual': no train pairs for \['Sexual'\]"):
        scan_pairs(pairs, ["Sexual"])
    with pytest.raises(experts.ExpertError, match=r"expert 'all': no train pairs for \['Harassment'"):
        scan_pairs(pairs, ["all"])  # all 7 categories, only 2 generated
    with pytest.raises(experts.ExpertError, match="4 train pairs cannot feed 6 workers"):
        scan_pairs(pairs, ["Hate"], num_workers=6)

    def rename(rows):
        rows[0]["category"] = "cats"
        return rows

    with pytest.raises(experts.ExpertError, match=r"row 1 .*unknown category 'cats'"):
        scan_pairs(_rewrite(pairs, tmp_path / "unknown", rename), ["Hate"])

    def no_split(rows):
        return [{k: v for k, v in r.items() if k != "split"} for r in rows]

    with pytest.raises(experts.ExpertError, match=r"missing column\(s\) \['split'\]"):
        scan_pairs(_rewrite(pairs, tmp_path / "nosplit", no_split), ["Hate"])
    with pytest.raises(experts.ExpertError, match="does not exist"):
        scan_pairs(str(tmp_path / "nowhere"), ["Hate"])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(experts.ExpertError, match="not a finished pairs dataset"):
        scan_pairs(str(tmp_path / "unfinished"), ["Hate"])


def test_dpo_inputs_pairing_flip_and_dropout(pairs):
    columns = ("pair_id", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image")
    batch = {k: np.array([r[k] for r in _rows(pairs)[:2]], dtype=object) for k in columns}
    rng = np.random.default_rng(0)
    winners, losers, captions, anchors = dpo_inputs(batch, DPOConfig(), rng, 32)
    assert winners.shape == (2, 3, 32, 32) and winners.min() >= -1 and winners.max() <= 1
    assert captions == list(batch["unsafe_prompt"]) and anchors == list(batch["safe_prompt"])
    _, _, c_safe, a_safe = dpo_inputs(batch, DPOConfig(pairing="safe"), rng, 32)
    assert c_safe == a_safe == list(batch["safe_prompt"])
    _, _, c_both, a_both = dpo_inputs(batch, DPOConfig(pairing="both"), rng, 32)
    assert c_both == list(batch["unsafe_prompt"]) + list(batch["safe_prompt"])
    assert a_both == list(batch["safe_prompt"]) * 2
    w2, l2, c2, a2 = dpo_inputs(batch, DPOConfig(pairing="both", caption_dropout=1.0), rng, 32)
    assert w2.shape[0] == 4 and c2 == a2 == [""] * 4  # a dropped caption's anchor is dropped with it
    flip = DPOConfig(random_flip=True)
    flipped, flipped_l, _, _ = dpo_inputs(batch, flip, np.random.default_rng(1), 32)
    for i in range(2):  # each pair is flipped as a whole or not at all
        same_w = np.array_equal(flipped[i], winners[i])
        assert same_w == np.array_equal(flipped_l[i], losers[i])
        if not same_w:
            assert np.array_equal(flipped[i], winners[i][..., ::-1])
    with pytest.raises(experts.ExpertError, match="images are 32x32, the model trains at 64x64"):
        dpo_inputs(batch, DPOConfig(), rng, 64)


def test_latent_cache_gives_the_uncached_inputs_and_encodes_each_image_once(pairs):
    pipe = load_pipeline(build_config({}).model)
    columns = ("pair_id", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image")
    rows = _rows(pairs)
    batch = {k: np.array([r[k] for r in rows[:3]], dtype=object) for k in columns}
    benign = {k: np.array([r[k] for r in rows[1:5]], dtype=object) for k in columns}
    dpo, cache = DPOConfig(anchor_weight=1.0, preserve_weight=1.0, pairing="both"), LatentCache()
    for _ in range(2):  # the second call reads every latent from the cache
        cached = step_inputs(pipe, dpo, batch, benign, np.random.default_rng(0), 32, cache)
    plain = step_inputs(pipe, dpo, batch, benign, np.random.default_rng(0), 32)
    assert len(cache) == 3 + 5  # the unsafe images of rows 0-2 and the safe images of rows 0-4
    for key in ("winner", "loser", "encoder_hidden_states", "anchor_states"):
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)  # batched kernels round apart
    torch.testing.assert_close(cached["benign"].latents, plain["benign"].latents, rtol=1e-4, atol=1e-5)
    assert cached["winner"].shape[0] == 6  # pairing "both": every pair twice


def test_probe_trains_the_workers_step_the_same_way_twice(pairs, mlflow_store, tmp_path):
    """The benchmarks' plain loop: every step's metrics, the same LoRA from one seed, and the reference
    untouched (a fresh adapter's first loss is log 2)."""
    config = make_config(tmp_path, mlflow_store)
    frame = pd.DataFrame(_rows(pairs))[list(PAIR_COLUMNS)]
    own, benign = frame[frame["category"] == CATEGORIES[0]], frame
    dpo = config.dpo.model_copy(update={"max_steps": 3})
    steps = list(probe.train_steps(config, dpo, own.reset_index(drop=True), benign, seed=3))
    assert [s for s, _, _ in steps] == [1, 2, 3]
    assert steps[0][2]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert {"loss", "implicit_acc", "margin_abs", "anchor_mse", "preserve_mse"} <= set(steps[-1][2])
    again = probe.train(config, dpo, own.reset_index(drop=True), benign, seed=3)
    first, second = lora_state(steps[-1][1].unet), lora_state(again.unet)
    assert all(torch.equal(first[k], second[k]) for k in first) and not again.unet.training


# -- training on Ray ----------------------------------------------------------------------------------

def _child_runs(config) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    exp = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{tracking.STAGE_TAG}` LIKE 'expert/%'")
    return {r.data.tags[tracking.STAGE_TAG]: r for r in runs}, runs


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three trainer start-ups: minutes on a quiet 2-core box, far more on a busy one
def test_train_experts_concurrently_with_a_failing_expert(pairs, ray_local, mlflow_store, tmp_path):
    config = make_config(tmp_path, mlflow_store)
    with tracking.pipeline_run(config), pytest.raises(experts.ExpertError) as failure:
        experts.train_experts(config, pairs=pairs)
    message = str(failure.value)
    assert "Violence" in message and "non-finite loss" in message and "at step 2" in message
    assert "Hate" not in message  # only Violence failed

    hate = experts.expert_dir(config.run_root, "Hate")
    meta = storage.read_json(storage.join(hate, layout.EXPERT_JSON))
    assert meta["steps"] == MAX_STEPS and meta["num_pairs"] == 4 and meta["categories"] == ["Hate"]
    assert math.isfinite(meta["final_metrics"]["loss"]) and "implicit_acc" in meta["final_metrics"]
    # The base model rendered these pairs, so it denoises their latents well (~0.05; encoding a VAE
    # posterior sample instead of its mode gave ~0.9, and the experts learned nothing).
    assert meta["final_metrics"]["ref_mse_l"] < 0.3
    assert meta["config"]["dpo"]["learning_rate"] == 1e-3
    assert experts.lora_paths(config) == {"Hate": layout.lora_file(hate)}
    assert not Path(experts.expert_dir(config.run_root, "Violence")).exists()
    violence_ckpts = sorted((tmp_path / "experts" / "_ray").glob("violence-*/checkpoint_*/state.pt"))
    assert violence_ckpts and {torch.load(p, weights_only=True)["step"] for p in violence_ckpts} == {1}

    by_name, runs = _child_runs(config)
    assert len(runs) == 2 and set(by_name) == {"expert/hate", "expert/violence"}
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    hate_run = by_name["expert/hate"]
    steps = [m.step for m in client.get_metric_history(hate_run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    logged = ("implicit_acc", "reward_margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l", "lr", "grad_norm",
              "anchor_mse", "preserve_mse", "logit_abs", "saturated", "margin_abs", "beta_unit_logit",
              "early_saturated")
    assert set(logged) <= set(hate_run.data.metrics)
    assert hate_run.data.params["dpo.beta"] == "5000.0" and hate_run.data.params["num_pairs"] == "4"
    artifacts = {a.path for a in client.list_artifacts(hate_run.info.run_id)}
    assert {"lora", "samples", layout.EXPERT_JSON} <= artifacts
    assert "non-finite loss" in by_name["expert/violence"].data.tags["safetydpo.error"]

    # The published LoRA is the trained adapter, and diffusers reads it back with the same scaling.
    pipe = load_toy_pipeline()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = pipe.encode_prompt(["a gun"], "cpu", 1, False)[0].detach()
    t = torch.tensor([400])
    with torch.no_grad():
        base = pipe.unet(latents, t, states).sample
        trained = copy.deepcopy(pipe.unet)
        add_lora(trained, config.dpo)
        final = sorted((tmp_path / "experts" / "_ray").glob("hate-*/checkpoint_*/state.pt"))[-1]
        load_lora_state(trained, torch.load(final, weights_only=True)["lora"])
        expected = trained(latents, t, states).sample
        pipe.load_lora_weights(hate)
        loaded = pipe.unet(latents, t, states).sample
    assert not torch.allclose(base, expected)
    assert torch.allclose(loaded, expected, atol=1e-6)

    # Re-run: Hate is finished and skipped; Violence resumes from its step-1 checkpoint and fails again.
    with tracking.pipeline_run(config, run_name="rerun") as parent:
        with pytest.raises(experts.ExpertError, match="Violence.*at step 2"):
            experts.train_experts(config, pairs=pairs)
        rerun_parent = parent.info.run_id
    rerun = {r.data.tags[tracking.STAGE_TAG]: r for r in mlflow.MlflowClient(config.tracking.tracking_uri)
             .search_runs([hate_run.info.experiment_id], f"tags.mlflow.parentRunId = '{rerun_parent}'")}
    assert set(rerun) == {"expert/violence"}  # nothing trained for Hate
    assert rerun["expert/violence"].data.metrics["resumed_from_step"] == 1
    assert storage.read_json(storage.join(hate, layout.EXPERT_JSON)) == meta

    # A changed setting changes the fingerprint: Hate is no longer finished.
    specs = scan_pairs(pairs, ["Hate"])
    assert is_finished(config, specs["Hate"])
    changed = make_config(tmp_path, mlflow_store, dpo_overrides={"Hate": {"beta": 2500}})
    assert not is_finished(changed, specs["Hate"])
    # so does new benign data, which the preservation term trains on
    other_benign = dataclasses.replace(specs["Hate"], benign_hash="0" * 16)
    assert not is_finished(config, other_benign)
