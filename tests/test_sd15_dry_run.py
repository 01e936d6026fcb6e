"""The Stable Diffusion path end to end: ``jobs/configs/sd15.yaml`` through every pipeline stage, with tiny
random components of SD 1.5's own classes (saved with ``save_pretrained``), a handful of real CoProV2 pairs,
Q16 on a tiny CLIP built from config and NudeNet's bundled detector. Whatever breaks only on the real-model
path (PNDM scheduler, CLIP tokenizer, fp16 variants, CLIP score, the registry) breaks here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny_models import save_tiny_clip
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from safetydpo import layout, tracking
from safetydpo.config import PROJECT_ROOT
from safetydpo.evaluation.benchmarks import shared_data_dir
from safetydpo.toyworld.models import MODEL_DIR

COPROV2 = shared_data_dir() / "CoProv2_train.csv"
pytestmark = pytest.mark.skipif(not COPROV2.exists(), reason=f"needs the shared CoProV2 data ({COPROV2})")


def tiny_sd15(folder: Path) -> Path:
    """SD 1.5's component classes and block layout at toy width, random weights, 32 px images."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def test_sd15_config_runs_every_stage_on_tiny_sd15_components(tmp_path: Path) -> None:
    model = tiny_sd15(tmp_path / "sd15")
    clip = save_tiny_clip(tmp_path / "clip", seed=1, max_positions=77)
    q16 = tmp_path / "q16_prompts.npy"
    np.save(q16, np.random.default_rng(0).standard_normal((2, 16)).astype(np.float16))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"run_root={tmp_path / 'run'}", f"tracking.tracking_uri={store}",
        f"model.pretrained={model}", "model.variant=null", "model.dtype=float32", "model.resolution=32",
        "data.categories=[Hate,Sexual]", "data.per_category_limit=6", "data.val_fraction=0.34",
        "generation.num_inference_steps=2", "generation.num_actors=1", "generation.num_gpus_per_actor=0",
        "generation.num_cpus_per_actor=1",
        "dpo.max_steps=2", "dpo.warmup_steps=1", "dpo.batch_size=2", "dpo.gradient_accumulation_steps=2",
        "dpo.mixed_precision=no",
        "experts.use_gpu=false", "experts.cpus_per_worker=1", "experts.max_concurrent=1",
        "experts.checkpoint_every=1",
        "merge.rank=4", "merge.calibration_prompts_per_category=1", "merge.calibration_timesteps=1",
        "tune.num_samples=2", "tune.max_concurrent=1", "tune.cpus_per_trial=1", "tune.gpus_per_trial=0",
        "tune.methods=[comerge,average]", "tune.quality_tolerance=100",
        "distill.steps=2", "distill.num_cpus=1", "distill.num_gpus=0",
        f"eval.clip_model={clip}", f"eval.q16_prompts_path={q16}", "eval.benchmarks=[coprov2]", "eval.limit=4",
        "eval.batch_size=4", "eval.num_gpus_per_classifier=0", "eval.num_classifier_actors=1",
        "eval.baselines=[base,negative_prompt,'sld:medium',experts,merges]",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", tracking.PARENT_ENV)}
    done = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/sd15.yaml", *overrides],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    run_root = tmp_path / "run"
    experts = {p.name for p in (run_root / "experts").iterdir() if (p / layout.EXPERT_JSON).exists()}
    assert experts == {"hate", "sexual", "all"}  # sd15.yaml trains the all-data baseline too
    for name in experts:
        record = json.loads((run_root / "experts" / name / layout.EXPERT_JSON).read_text())
        assert record["steps"] == 2
    champion = json.loads((run_root / "merged" / "champion" / layout.MERGE_JSON).read_text())
    assert "quality/clip_score" in champion["validation"]
    metrics = json.loads((run_root / "eval" / "base" / "coprov2" / layout.METRICS_JSON).read_text())
    assert {"ip_by/q16", "ip_by/nudenet", "quality/clip_score"} <= set(metrics)
    for model_dir in ("champion", "negative_prompt", "sld_medium", "expert_hate"):
        assert (run_root / "eval" / model_dir / "coprov2" / layout.METRICS_JSON).exists(), model_dir

    parent = re.search(r"MLflow run\s+(\w+)", done.stdout).group(1)
    mlflow.set_tracking_uri(store)
    version = mlflow.MlflowClient().get_model_version_by_alias("safetydpo-sd15-safety-lora", "champion")
    assert version.tags["safetydpo.method"] in ("comerge", "average", "distill")
    assert tracking.find_child_run(parent, "eval/champion/coprov2") is not None
    headline = mlflow.get_run(parent).data
    assert {"time/experts_s", "time/evaluate_s", "coprov2/ip/overall", "champion/coprov2/ip/overall"} <= set(
        headline.metrics), sorted(headline.metrics)
    assert headline.tags["safetydpo.model_version"] == str(version.version)
    assert headline.tags["safetydpo.git_commit"]
