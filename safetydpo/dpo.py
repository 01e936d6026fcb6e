"""The Diffusion-DPO objective, with the reference model being the UNet itself, LoRA switched off.

For a caption c, a winner latent x_w (the safe image) and a loser latent x_l (the unsafe one),
both are noised with **one** timestep t and **one** noise e, and

    loss = -logsigmoid(-beta/2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)))

where ``mse_*`` is the per-sample error of the trained model's prediction against the training
target (the noise for epsilon models, the velocity for v-prediction models such as SD 2.1) and
``ref_mse_*`` the same for the frozen reference. The loss falls when the model fits the winner
better *relative to the reference* than it fits the loser. ``beta`` follows the SafetyDPO
convention (5000 for SD 1.5); diffusers' Diffusion-DPO research script folds the 1/2 into its beta,
so its ``beta_dpo=2500`` is this module's ``beta=5000``.

``sft_weight`` optionally adds ``sft_weight * mse_w``, a supervised term on the winner (DPO+SFT, as
in RPO, Pang et al. 2024): pure DPO can meet its objective by fitting the *loser* worse, which
unlearns the unsafe image without teaching the safe one; the winner term makes the model move
towards the safe twin. 0 (default) is the paper's pure Diffusion-DPO.

Two optional terms keep an expert from damaging what it should not touch; both distill from the
reference, so their optimum is "change nothing" whatever the quality of the data:

- ``anchor_weight`` times the *anchor* error: at the noisy winner and loser latents, the model under
  the pair's caption should predict what the reference predicts under the **safe** prompt (the
  model-based objective of Concept Ablation, Kumari et al. 2023, with the safe twin as anchor). It
  teaches the unsafe prompt to render its safe twin, and, unlike ``sft_weight``, with a target that
  is the reference's own guided behaviour rather than one noisy sample.
- ``preserve_weight`` times the *preservation* error: on benign latents (``Benign``: images of
  other prompts, noised at their own timestep) the model should predict what the reference does,
  under their captions and under the empty caption. Classifier-free guidance multiplies any change
  of the conditional-minus-unconditional prediction by the guidance scale, so a LoRA trained only on
  the expert's own captions also redraws benign objects; this term pins them.

The reference is a no-grad forward of the same UNet with its adapters disabled, not a second copy:
with LoRA the base weights are frozen, so "LoRA off" *is* the reference, at no extra weight memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

METRIC_NAMES = ("loss", "dpo_loss", "implicit_acc", "reward_margin", "logit_abs", "saturated", "margin_abs",
                "mse_w", "mse_l", "ref_mse_w", "ref_mse_l")
SATURATED_LOGIT = 4.6  # |logit| beyond which a pair's gradient weight sigmoid(-|logit|) is below 1%


def unit_logit_beta(margin_abs: float) -> float:
    """The beta at which pairs whose MSE margin is ``margin_abs`` have |logit| 1.

    The logit is ``-beta/2 * margin`` with ``margin = (mse_w - mse_l) - (ref_mse_w - ref_mse_l)``, whose size
    depends on the model, the latent size and how far the learning rate moves the LoRA in a step, so a beta
    tuned on one model (5000: SD 1.5, 64x64 latents, lr 1e-5) can saturate the sigmoid on another within a
    few steps, after which only the hardest pairs teach anything. Measured over the first steps, ``2 /
    mean|margin|`` is where the loss starts in its informative range (the trainer logs it as
    ``beta_unit_logit`` and warns when most pairs saturate early).
    """
    return 2.0 / margin_abs if margin_abs > 0 else float("inf")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32 whatever the autocast dtype (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dpo_loss(mse_w: torch.Tensor, mse_l: torch.Tensor, ref_mse_w: torch.Tensor, ref_mse_l: torch.Tensor,
             beta: float, sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss (plus ``sft_weight`` times the winner's MSE) from per-sample MSEs (each (N,)),
    and detached batch-mean metrics.

    ``reward_margin`` is the implicit reward of the winner minus the loser's (the logit inside the
    sigmoid); ``implicit_acc`` is the share of pairs where it is positive (ties at init count as 0);
    ``logit_abs`` its mean size, ``saturated`` the share of pairs beyond :data:`SATURATED_LOGIT`, and
    ``margin_abs`` the mean |margin| before beta scales it (:func:`unit_logit_beta`).
    """
    margin = (mse_w - mse_l) - (ref_mse_w - ref_mse_l)
    inside = -0.5 * beta * margin
    dpo = -F.logsigmoid(inside).mean()
    loss = dpo + sft_weight * mse_w.mean() if sft_weight else dpo
    metrics = {
        "loss": loss.detach(),
        "dpo_loss": dpo.detach(),
        "implicit_acc": (inside > 0).float().mean().detach(),
        "reward_margin": inside.mean().detach(),
        "logit_abs": inside.abs().mean().detach(),
        "saturated": (inside.abs() > SATURATED_LOGIT).float().mean().detach(),
        "margin_abs": margin.abs().mean().detach(),
        "mse_w": mse_w.mean().detach(),
        "mse_l": mse_l.mean().detach(),
        "ref_mse_w": ref_mse_w.mean().detach(),
        "ref_mse_l": ref_mse_l.mean().detach(),
    }
    return loss, metrics


def training_target(scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The UNet as the frozen base model for the ``with`` body (its LoRA adapters off)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, carries the graph to the LoRA parameters
    metrics: dict[str, torch.Tensor]  # detached scalars: METRIC_NAMES, plus anchor_mse / preserve_mse when on


@dataclass
class Benign:
    """Inputs the preservation term keeps as the reference has them."""

    latents: torch.Tensor  # (M, C, h, w) clean latents of benign images
    states: torch.Tensor  # (M, L, D) text states of their captions
    empty_states: torch.Tensor  # (1, L, D) text states of "", classifier-free guidance's unconditional input


def dpo_step(unet: UNet2DConditionModel, scheduler: SchedulerMixin, winner: torch.Tensor, loser: torch.Tensor,
             encoder_hidden_states: torch.Tensor, beta: float, sft_weight: float = 0.0, *,
             anchor_states: torch.Tensor | None = None, anchor_weight: float = 0.0,
             benign: Benign | None = None, preserve_weight: float = 0.0,
             generator: torch.Generator | None = None,
             model: torch.nn.Module | None = None, reference: torch.nn.Module | None = None) -> DPOOutput:
    """Loss and metrics of one batch of pairs (latents (N,C,h,w), text states (N,L,D)).

    Draws one timestep and one noise per pair, shared by winner and loser. Everything the trained
    model sees (winner and loser, then the benign inputs when ``preserve_weight``) goes through it as
    one batch; the reference sees the same plus, when ``anchor_weight``, the pairs under
    ``anchor_states`` (the safe prompts' states, (N,L,D)). The reference forward runs first,
    without grad, so its activations are freed before the model forward builds its graph.
    ``model`` is what the gradient forward calls (e.g. the DDP wrapper of ``unet``); default
    ``unet``. ``reference`` is a separate frozen model (full fine-tuning, or the copy-based
    baseline of the benchmark); default: ``unet`` with its adapters disabled.
    """
    n = winner.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=winner.device,
                              generator=generator).long()
    noise = torch.randn(winner.shape, device=winner.device, dtype=winner.dtype, generator=generator)
    latents = torch.cat([winner, loser])
    noise2, t2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    noisy = scheduler.add_noise(latents, noise2, t2)
    target = training_target(scheduler, latents, noise2, t2)
    inputs = [(noisy, t2, torch.cat([encoder_hidden_states, encoder_hidden_states]))]
    preserving = bool(preserve_weight) and benign is not None
    if preserving:
        m = benign.latents.shape[0]
        t_b = torch.randint(0, scheduler.config.num_train_timesteps, (m,), device=winner.device,
                            generator=generator).long()
        noise_b = torch.randn(benign.latents.shape, device=winner.device, dtype=winner.dtype, generator=generator)
        noisy_b = scheduler.add_noise(benign.latents, noise_b, t_b)
        inputs += [(noisy_b, t_b, benign.states), (noisy_b, t_b, benign.empty_states.expand(m, -1, -1))]
    anchored = bool(anchor_weight) and anchor_states is not None
    ref_inputs = inputs + ([(noisy, t2, torch.cat([anchor_states, anchor_states]))] if anchored else [])

    def forward(net: torch.nn.Module, batch: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        return net(*(torch.cat(part) for part in zip(*batch, strict=True))).sample

    with torch.no_grad(), adapters_disabled(unet) if reference is None else nullcontext(reference) as ref:
        ref_pred = forward(ref, ref_inputs)
    pred = forward(model or unet, inputs)
    mse, ref_mse = per_sample_mse(pred[:2 * n], target), per_sample_mse(ref_pred[:2 * n], target)
    loss, metrics = dpo_loss(mse[:n], mse[n:], ref_mse[:n], ref_mse[n:], beta, sft_weight)
    if anchored:
        anchor = per_sample_mse(pred[:2 * n], ref_pred[-2 * n:]).mean()
        loss = loss + anchor_weight * anchor
        metrics["anchor_mse"] = anchor.detach()
    if preserving:
        preserve = per_sample_mse(pred[2 * n:], ref_pred[2 * n:pred.shape[0]]).mean()
        loss = loss + preserve_weight * preserve
        metrics["preserve_mse"] = preserve.detach()
    metrics["loss"] = loss.detach()
    return DPOOutput(loss, metrics)
