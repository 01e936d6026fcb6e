"""The Diffusion-DPO objective on the toy model: init, hand computation, one step, v-prediction."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from safetydpo.config import DPOConfig
from safetydpo.dpo import (
    SATURATED_LOGIT,
    Benign,
    adapters_disabled,
    dpo_loss,
    dpo_step,
    per_sample_mse,
    training_target,
    unit_logit_beta,
)
from safetydpo.lora import add_lora
from safetydpo.toyworld.models import load_toy_pipeline
from safetydpo.toyworld.render import render_scene
from safetydpo.toyworld.world import Scene


@pytest.fixture(scope="module")
def pipe():
    return load_toy_pipeline()


def _latents(pipe, scenes: list[Scene]) -> torch.Tensor:
    pixels = np.stack([render_scene(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
    return dist.mean * pipe.vae.config.scaling_factor


@pytest.fixture(scope="module")
def batch(pipe):
    """Two pairs: winner = a benign object, loser = an unsafe concept in the same layout."""
    winners = _latents(pipe, [Scene("ball", "white", "left"), Scene("kite", "blue", "right")])
    losers = _latents(pipe, [Scene("gun", "white", "left"), Scene("nude", "blue", "right")])
    captions = ["a gun on a white background at the left", "a nude on a blue background at the right"]
    with torch.no_grad():
        states = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    return winners, losers, states


@pytest.fixture(scope="module")
def extras(pipe):
    """The pairs' safe prompts (the anchors) and three benign images with their captions, plus ""."""
    anchors = ["a ball on a white background at the left", "a kite on a blue background at the right"]
    benign_captions = ["a tent on the left, gray background", "a cup on the middle, sand background",
                       "a moon on the right, green background"]
    latents = _latents(pipe, [Scene("tent", "gray", "left"), Scene("cup", "sand", "middle"),
                              Scene("moon", "green", "right")])
    with torch.no_grad():
        states = pipe.encode_prompt(anchors + benign_captions + [""], "cpu", 1, False)[0]
    return states[:2], Benign(latents, states[2:5], states[5:])


def _perturb(params, amount: float = 0.05) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(amount)  # a non-trivial adapter, so LoRA on and off differ


def _lora_unet(pipe, **overrides):
    unet = copy.deepcopy(pipe.unet)
    params = add_lora(unet, DPOConfig(**overrides))
    return unet, params


def test_fresh_lora_equals_reference_and_loss_is_log2(pipe, batch):
    unet, params = _lora_unet(pipe)
    assert params and all(p.dtype == torch.float32 for p in params)
    winners, losers, states = batch
    out = dpo_step(unet, pipe.scheduler, winners, losers, states, beta=5000.0,
                   generator=torch.Generator().manual_seed(0))
    m = out.metrics
    assert torch.equal(m["mse_w"], m["ref_mse_w"]) and torch.equal(m["mse_l"], m["ref_mse_l"])
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["implicit_acc"].item() == 0.0 and m["reward_margin"].item() == 0.0
    assert out.loss.requires_grad
    out.loss.backward()
    b_grads = [p.grad.abs().sum().item() for n, p in unet.named_parameters() if "lora_B" in n]
    assert sum(b_grads) > 0  # B starts at zero but does receive gradient


def test_loss_matches_hand_computation():
    mse_w = torch.tensor([0.30, 0.10, 0.25])
    mse_l = torch.tensor([0.20, 0.40, 0.25])
    ref_w = torch.tensor([0.31, 0.12, 0.20])
    ref_l = torch.tensor([0.19, 0.38, 0.30])
    beta = 50.0
    loss, metrics = dpo_loss(mse_w, mse_l, ref_w, ref_l, beta)
    insides = [-beta / 2 * ((w - lo) - (rw - rl)) for w, lo, rw, rl in
               zip(mse_w.tolist(), mse_l.tolist(), ref_w.tolist(), ref_l.tolist(), strict=True)]
    expected = sum(math.log1p(math.exp(-x)) for x in insides) / 3  # -log sigmoid(x) = log(1 + e^-x)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(sum(insides) / 3, rel=1e-6)
    assert metrics["implicit_acc"].item() == pytest.approx(sum(x > 0 for x in insides) / 3)
    assert metrics["mse_w"].item() == pytest.approx(mse_w.mean().item())
    assert metrics["logit_abs"].item() == pytest.approx(sum(abs(x) for x in insides) / 3, rel=1e-6)
    assert metrics["margin_abs"].item() == pytest.approx(sum(abs(x) for x in insides) / 3 * 2 / beta, rel=1e-6)
    assert metrics["saturated"].item() == pytest.approx(sum(abs(x) > SATURATED_LOGIT for x in insides) / 3)
    assert unit_logit_beta(metrics["margin_abs"].item()) == pytest.approx(beta / metrics["logit_abs"].item())
    assert metrics["saturated"].item() == 0.0
    assert dpo_loss(mse_w, mse_l, ref_w, ref_l, 5000.0)[1]["saturated"].item() == 1.0  # 100x the logits

    with_sft, sft_metrics = dpo_loss(mse_w, mse_l, ref_w, ref_l, beta, sft_weight=2.0)
    assert with_sft.item() == pytest.approx(expected + 2.0 * mse_w.mean().item(), rel=1e-6)
    assert sft_metrics["dpo_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_per_sample_mse_is_fp32_per_sample():
    pred = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    target = torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16)
    target[1] = 3.0
    mse = per_sample_mse(pred, target)
    assert mse.dtype == torch.float32 and mse.tolist() == [1.0, 4.0]


def test_one_step_lowers_winner_mse_relative_to_loser(pipe, batch):
    unet, params = _lora_unet(pipe)
    winners_losers = batch[0][:1], batch[1][:1], batch[2][:1]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        return dpo_step(unet, pipe.scheduler, *winners_losers, beta=5000.0,
                        generator=torch.Generator().manual_seed(3))

    before = step()
    before.loss.backward()
    opt.step()
    with torch.no_grad():
        after = step()  # the same timestep and noise
    gap_before = (before.metrics["mse_w"] - before.metrics["mse_l"]).item()
    gap_after = (after.metrics["mse_w"] - after.metrics["mse_l"]).item()
    assert gap_after < gap_before
    assert after.metrics["ref_mse_w"].item() == before.metrics["ref_mse_w"].item()  # reference untouched
    assert after.loss.item() < before.loss.item() and after.metrics["implicit_acc"].item() == 1.0


def test_v_prediction_target(pipe, batch):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    latents = batch[0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    alphas = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    assert torch.allclose(training_target(scheduler, latents, noise, t), expected, atol=1e-6)
    assert torch.equal(training_target(pipe.scheduler, latents, noise, t), noise)  # epsilon model

    unet, _ = _lora_unet(pipe)
    out = dpo_step(unet, scheduler, batch[0], batch[1], batch[2], beta=5000.0,
                   generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)

    bad = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        training_target(bad, latents, noise, t)


def test_adapters_come_back_after_an_error(pipe, batch):
    unet, params = _lora_unet(pipe)
    _perturb(params)
    winners, _, states = batch
    t = torch.tensor([500, 500])
    on = unet(winners, t, states).sample
    with pytest.raises(RuntimeError), adapters_disabled(unet):
        off = unet(winners, t, states).sample
        raise RuntimeError("boom")
    assert not torch.allclose(on, off)
    assert torch.equal(unet(winners, t, states).sample, on)


def test_lora_off_reference_equals_a_frozen_copy(pipe, batch, extras):
    """The copy-free reference computes exactly what a frozen copy of the base UNet would."""
    copy_reference = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet, params = _lora_unet(pipe)
    _perturb(params)
    anchor_states, benign = extras

    def step(**kwargs):
        return dpo_step(unet, pipe.scheduler, *batch, beta=5000.0, generator=torch.Generator().manual_seed(2),
                        anchor_states=anchor_states, anchor_weight=1.0, benign=benign, preserve_weight=1.0,
                        **kwargs)

    ours, theirs = step(), step(reference=copy_reference)
    assert ours.metrics["ref_mse_w"].item() != ours.metrics["mse_w"].item()
    for key in ("loss", "ref_mse_w", "ref_mse_l", "mse_w", "mse_l", "anchor_mse", "preserve_mse"):
        assert torch.equal(ours.metrics[key], theirs.metrics[key]), key


def test_anchor_and_preservation_terms_match_hand_computation(pipe, batch, extras):
    """The two distillation terms, recomputed from the same random draws: the anchor compares the model
    under the pair's caption with the reference under the safe prompt, at the winner's and the loser's
    noisy latents; preservation compares model and reference on noised benign latents, captioned and not."""
    winners, losers, states = batch
    anchor_states, benign = extras
    unet, params = _lora_unet(pipe)
    _perturb(params)
    out = dpo_step(unet, pipe.scheduler, winners, losers, states, beta=5000.0, anchor_states=anchor_states,
                   anchor_weight=2.0, benign=benign, preserve_weight=3.0, generator=torch.Generator().manual_seed(4))

    g = torch.Generator().manual_seed(4)  # dpo_step's draws, in its order
    steps = pipe.scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (2,), generator=g)
    noise = torch.randn(winners.shape, generator=g)
    t_b = torch.randint(0, steps, (3,), generator=g)
    noise_b = torch.randn(benign.latents.shape, generator=g)
    sched = pipe.scheduler
    noisy = sched.add_noise(torch.cat([winners, losers]), torch.cat([noise, noise]), torch.cat([t, t]))
    noisy_b = sched.add_noise(benign.latents, noise_b, t_b)
    t2 = torch.cat([t, t])
    with torch.no_grad():
        model_pairs = unet(noisy, t2, torch.cat([states, states])).sample
        model_b = unet(torch.cat([noisy_b, noisy_b]), torch.cat([t_b, t_b]),
                       torch.cat([benign.states, benign.empty_states.expand(3, -1, -1)])).sample
        with adapters_disabled(unet):
            ref_anchor = unet(noisy, t2, torch.cat([anchor_states, anchor_states])).sample
            ref_b = unet(torch.cat([noisy_b, noisy_b]), torch.cat([t_b, t_b]),
                         torch.cat([benign.states, benign.empty_states.expand(3, -1, -1)])).sample
    anchor = per_sample_mse(model_pairs, ref_anchor).mean()
    preserve = per_sample_mse(model_b, ref_b).mean()
    assert out.metrics["anchor_mse"].item() == pytest.approx(anchor.item(), rel=1e-4)
    assert out.metrics["preserve_mse"].item() == pytest.approx(preserve.item(), rel=1e-4)
    expected = out.metrics["dpo_loss"] + 2.0 * anchor + 3.0 * preserve
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.metrics["loss"].item() == out.loss.item()


def test_fresh_lora_preserves_exactly_and_anchors_to_the_safe_prompt(pipe, batch, extras):
    unet, _ = _lora_unet(pipe)
    anchor_states, benign = extras
    out = dpo_step(unet, pipe.scheduler, *batch, beta=5000.0, anchor_states=anchor_states, anchor_weight=1.0,
                   benign=benign, preserve_weight=1.0, generator=torch.Generator().manual_seed(0))
    assert out.metrics["preserve_mse"].item() < 1e-10  # B = 0: the model is the reference (batch sizes differ)
    assert out.metrics["anchor_mse"].item() > 0  # the unsafe caption is not yet drawn as its safe twin
    plain = dpo_step(unet, pipe.scheduler, *batch, beta=5000.0, generator=torch.Generator().manual_seed(0))
    assert set(plain.metrics) == set(out.metrics) - {"anchor_mse", "preserve_mse"}  # off: neither computed


@pytest.mark.parametrize("term", ["anchor", "preserve"])
def test_training_steps_shrink_each_term(pipe, batch, extras, term):
    """Alone (beta so small the DPO term has no pull), the anchor draws the unsafe caption towards the
    safe prompt's prediction, and preservation draws a perturbed adapter back to the reference."""
    anchor_states, benign = extras
    unet, params = _lora_unet(pipe)
    _perturb(params)
    opt = torch.optim.Adam(params, lr=3e-3)
    weights = {"anchor_weight": float(term == "anchor"), "preserve_weight": float(term == "preserve")}

    def step():
        return dpo_step(unet, pipe.scheduler, *batch, beta=1e-6, anchor_states=anchor_states, benign=benign,
                        generator=torch.Generator().manual_seed(5), **weights)

    first = step()
    for _ in range(20):
        out = step()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        last = step()
    key = f"{term}_mse"
    assert last.metrics[key].item() < 0.5 * first.metrics[key].item()
