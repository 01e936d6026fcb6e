"""Pretrain the toy world from its renderer: tokenizer, text encoder, VAE, detector, UNet.

    python -m safetydpo.toyworld.pretrain [--out DIR] [--seed 0]

Seeded and reproducible on one CPU thread count; about 25 minutes on 2 cores. Writes a
diffusers ``StableDiffusionPipeline`` folder (``model/``) and the detector
(``detector/``) into ``--out`` (default: the package's shipped weights), then measures
the world's targets (see :mod:`safetydpo.toyworld.measure`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from safetydpo.toyworld import models
from safetydpo.toyworld.detector import (
    BACKGROUND_LABELS,
    CATEGORY_LABELS,
    NONE,
    OBJECT_LABELS,
    Detector,
    ToyDetector,
    to_pixels,
)
from safetydpo.toyworld.prompts import layouts, training_captions
from safetydpo.toyworld.render import render_background, render_scene
from safetydpo.toyworld.tokenizer import build_tokenizer
from safetydpo.toyworld.world import (
    BACKGROUNDS,
    POSITIONS,
    Scene,
    all_subjects,
    caption,
    vocabulary_words,
)

log = logging.getLogger("safetydpo.pretrain")


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(params, lr: float, total: int, warmup: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, total, warmup))
    return opt, sched


def _update(opt, sched, loss: torch.Tensor, step: int, steps: int, what: str, clip: float | None = None) -> None:
    """One optimiser step (optionally clipping the gradient norm), logged every 100 steps."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()
    sched.step()
    if step % 100 == 0 or step == steps - 1:
        log.info("%s step %d loss %.5f", what, step, loss.item())


def encode_text(tokenizer, text_encoder, captions: list[str], batch: int = 512) -> torch.Tensor:
    """(N, MAX_TOKENS, TEXT_DIM) last hidden states, as the pipeline computes them."""
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            ids = tokenizer(captions[i:i + batch], padding="max_length", max_length=models.MAX_TOKENS,
                            truncation=True, return_tensors="pt").input_ids
            out.append(text_encoder(ids)[0])
    return torch.cat(out)


def train_text_encoder(tokenizer, steps: int, seed: int):
    """Supervised: the pooled caption state must name subject, background and position."""
    torch.manual_seed(seed)
    encoder = models.build_text_encoder(tokenizer)
    subjects, bgs, poss = all_subjects(), list(BACKGROUNDS), list(POSITIONS)
    pairs = list(training_captions("train"))
    ids = tokenizer([c for c, _ in pairs], padding="max_length", max_length=models.MAX_TOKENS,
                    truncation=True, return_tensors="pt").input_ids
    targets = torch.tensor([(subjects.index(s.subject), bgs.index(s.background), poss.index(s.position))
                            for _, s in pairs])
    heads = torch.nn.ModuleList(torch.nn.Linear(models.TEXT_DIM, n) for n in (len(subjects), len(bgs), len(poss)))
    opt, sched = _optimizer([*encoder.parameters(), *heads.parameters()], 2e-3, steps, 50)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(ids), (256,), generator=gen)
        pooled = encoder(ids[idx]).pooler_output
        loss = sum(F.cross_entropy(h(pooled), targets[idx, k]) for k, h in enumerate(heads))
        _update(opt, sched, loss, step, steps, "text encoder")
    return encoder.eval().requires_grad_(False)


def render_pool(copies: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``copies`` jittered renders of every scene, plus empty backgrounds."""
    rng = np.random.default_rng(seed)
    scenes = [Scene(s, b, p) for s in all_subjects() for b in BACKGROUNDS for p in POSITIONS]
    images, labels = [], []
    for scene in scenes:
        for _ in range(copies):
            images.append(render_scene(scene, rng))
            labels.append(scene)
    return np.stack(images), labels


def train_vae(images: np.ndarray, steps: int, seed: int, batch: int = 64):
    torch.manual_seed(seed)
    vae = models.build_vae()
    pixels = to_pixels(images)
    opt, sched = _optimizer(vae.parameters(), 1e-3, steps, 100)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-5 * posterior.kl().mean()
        _update(opt, sched, loss, step, steps, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


def _decode(vae, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = torch.cat([vae.decode(latents[i:i + 256] / vae.config.scaling_factor).sample
                         for i in range(0, len(latents), 256)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _labels(scenes: list[Scene | None], backgrounds: list[str]) -> torch.Tensor:
    rows = []
    for scene, bg in zip(scenes, backgrounds, strict=True):
        category = (scene.category if scene else None) or NONE
        obj = scene.subject if scene and scene.category is None else NONE
        rows.append((CATEGORY_LABELS.index(category), OBJECT_LABELS.index(obj), BACKGROUND_LABELS.index(bg)))
    return torch.tensor(rows)


def train_detector(images: np.ndarray, scenes: list[Scene | None], backgrounds: list[str],
                   steps: int, seed: int, batch: int = 128) -> ToyDetector:
    """CNN on renders and their VAE reconstructions, with noise and blur so it also reads samples."""
    torch.manual_seed(seed)
    model = Detector()
    pixels, labels = to_pixels(images), _labels(scenes, backgrounds)
    opt, sched = _optimizer(model.parameters(), 2e-3, steps, 50)
    gen = torch.Generator().manual_seed(seed)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = (blur[:, None] * blur[None, :] / 16).expand(3, 1, 3, 3)
    for step in range(steps):
        idx = torch.randint(len(pixels), (batch,), generator=gen)
        x = pixels[idx]
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3)
        use_blur = (torch.rand(batch, 1, 1, 1, generator=gen) < 0.3).float()
        x = use_blur * blurred + (1 - use_blur) * x
        x = x + torch.randn(x.shape, generator=gen) * torch.rand(batch, 1, 1, 1, generator=gen) * 0.08
        out = model(x)
        y = labels[idx]
        loss = (F.cross_entropy(out["category"], y[:, 0]) + F.cross_entropy(out["object"], y[:, 1])
                + F.cross_entropy(out["background"], y[:, 2]))
        _update(opt, sched, loss, step, steps, "detector")
    return ToyDetector(model)


def train_unet(latents: torch.Tensor, scenes: list[Scene], tokenizer, text_encoder,
               steps: int, seed: int, batch: int = 128, lr: float = 1e-3):
    """Epsilon-prediction training on cached latents and caption states, min-SNR weighted, EMA."""
    torch.manual_seed(seed)
    unet = models.build_unet()
    noise_scheduler = DDPMScheduler.from_config(models.build_scheduler().config)
    train_layouts: dict[tuple[str, str], list[int]] = {}
    for template, bg, pos in layouts("train"):
        train_layouts.setdefault((bg, pos), []).append(template)
    captions = [c for c, _ in training_captions("train")]
    index = {c: i for i, c in enumerate(captions)}
    states = encode_text(tokenizer, text_encoder, captions)
    empty = encode_text(tokenizer, text_encoder, [""])[0]
    # for each pooled latent, the caption indices that may describe it
    choices = [torch.tensor([index[caption(s, t)] for t in train_layouts[(s.background, s.position)]])
               for s in scenes]
    ema = EMAModel(unet.parameters(), decay=0.999)
    opt, sched = _optimizer(unet.parameters(), lr, steps, 200)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen).tolist()
        pick = [choices[i][torch.randint(len(choices[i]), (1,), generator=gen)].item() for i in idx]
        cond = states[pick].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance
        cond[drop] = empty
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, cond).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        _update(opt, sched, loss, step, steps, "unet", clip=1.0)
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    return unet.eval()


def pretrain(out: Path, seed: int, text_steps: int, vae_steps: int, detector_steps: int,
             unet_steps: int) -> dict:
    timings = {}
    t0 = time.time()
    tokenizer = build_tokenizer(vocabulary_words(), models.MAX_TOKENS)
    text_encoder = train_text_encoder(tokenizer, text_steps, seed)
    timings["text_encoder_s"] = time.time() - t0

    t0 = time.time()
    images, scenes = render_pool(copies=6, seed=seed)
    vae, latents = train_vae(images, vae_steps, seed)
    timings["vae_s"] = time.time() - t0

    t0 = time.time()
    rng = np.random.default_rng(seed + 1)
    empties = np.stack([render_background(b, rng) for b in BACKGROUNDS for _ in range(40)])
    empty_bgs = [b for b in BACKGROUNDS for _ in range(40)]
    recon = _decode(vae, latents)
    det_images = np.concatenate([images, recon, empties])
    det_scenes = [*scenes, *scenes, *([None] * len(empties))]
    det_bgs = [s.background for s in scenes] * 2 + empty_bgs
    detector = train_detector(det_images, det_scenes, det_bgs, detector_steps, seed)
    timings["detector_s"] = time.time() - t0

    t0 = time.time()
    unet = train_unet(latents, scenes, tokenizer, text_encoder, unet_steps, seed)
    timings["unet_s"] = time.time() - t0

    pipe = models.assemble_pipeline(unet, vae, text_encoder, tokenizer, models.build_scheduler())
    pipe.save_pretrained(out / "model")
    detector.save_pretrained(out / "detector")
    info = {"seed": seed, "steps": {"text_encoder": text_steps, "vae": vae_steps, "detector": detector_steps,
                                    "unet": unet_steps}, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch_threads": torch.get_num_threads()}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=models.WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--detector-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal floats in small nets slow CPU steps by 10x
    info = pretrain(args.out, args.seed, args.text_steps, args.vae_steps, args.detector_steps, args.unet_steps)
    log.info("pretrained in %s", info["timings_s"])


if __name__ == "__main__":
    main()
