"""Measure the toy world against its targets: detector accuracy, base-model IP and fidelity, speed.

    python -m safetydpo.toyworld.measure [--n 32] [--steps 20] [--guidance 5] [--write]

``--write`` records the figures in ``weights/measurements.json``, which the tests and the
evaluation stage compare against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from safetydpo.categories import CATEGORIES
from safetydpo.rendering import render
from safetydpo.toyworld.detector import NONE, ToyDetector
from safetydpo.toyworld.metrics import judge, rate
from safetydpo.toyworld.models import DETECTOR_DIR, MODEL_DIR, WEIGHTS_DIR
from safetydpo.toyworld.prompts import make_pairs
from safetydpo.toyworld.render import render_scene
from safetydpo.toyworld.world import BACKGROUNDS, POSITIONS, Scene, all_subjects


def detector_accuracy(detector: ToyDetector, copies: int = 2, seed: int = 99) -> dict[str, float]:
    """Accuracy on fresh jittered renders of every scene (category incl. none, object incl. none)."""
    rng = np.random.default_rng(seed)
    scenes = [Scene(s, b, p) for s in all_subjects() for b in BACKGROUNDS for p in POSITIONS] * copies
    det = detector.detect(np.stack([render_scene(s, rng) for s in scenes]))
    cats = det.top_category
    return {
        "category": float(np.mean([c == (s.category or NONE) for c, s in zip(cats, scenes, strict=True)])),
        "object": float(np.mean([o == (NONE if s.category else s.subject)
                                 for o, s in zip(det.objects, scenes, strict=True)])),
        "background": float(np.mean([b == s.background for b, s in zip(det.backgrounds, scenes, strict=True)])),
        "n_images": len(scenes),
    }


def model_safety(pipe, detector: ToyDetector, n_per_category: int, steps: int, guidance: float,
                 seed: int = 0, batch: int = 64, split: str = "test") -> dict:
    """IP and redirect rate per category on ``split``'s unsafe prompts, benign fidelity on their safe twins.

    ``split="validation"`` for anything that chooses a setting; the test split only reports.
    """
    pairs = make_pairs(split, n_per_category, seed)
    prompts = [p.unsafe_prompt for p in pairs] + [p.safe_prompt for p in pairs]
    seeds = [p.seed for p in pairs] * 2
    images = np.concatenate([
        render(pipe, prompts[i:i + batch], seeds[i:i + batch], num_inference_steps=steps, guidance_scale=guidance)
        for i in range(0, len(prompts), batch)
    ])
    verdicts = judge(prompts, detector.detect(images))
    unsafe, safe = verdicts[:len(pairs)], verdicts[len(pairs):]

    def by_category(field: str) -> dict[str, float]:
        return {c: rate([getattr(v, field) for v, p in zip(unsafe, pairs, strict=True) if p.category == c])
                for c in CATEGORIES}

    return {
        "ip": by_category("flagged"),
        "ip_overall": rate([v.flagged for v in unsafe]),
        "benign_fidelity": rate([v.faithful for v in safe]),
        "benign_ip": rate([v.flagged for v in safe]),
        "redirect_rate": rate([v.redirected for v in unsafe]),
        "redirect": by_category("redirected"),
        "n_per_category": n_per_category,
        "split": split,
    }


def generation_speed(pipe, steps: int, guidance: float, batch: int = 64, repeats: int = 3) -> float:
    """Images/s at ``batch`` with classifier-free guidance, VAE decode included."""
    pairs = make_pairs("test", batch // len(CATEGORIES) + 1, seed=7)
    prompts = [p.safe_prompt for p in pairs][:batch]
    render(pipe, prompts[:8], range(8), num_inference_steps=steps, guidance_scale=guidance)  # warm-up
    start = time.perf_counter()
    for r in range(repeats):
        render(pipe, prompts, range(r * batch, (r + 1) * batch), num_inference_steps=steps, guidance_scale=guidance)
    return batch * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--detector-dir", type=Path, default=DETECTOR_DIR)
    parser.add_argument("--n", type=int, default=32, help="test pairs per category")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="record in weights/measurements.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    detector = ToyDetector.from_pretrained(args.detector_dir)
    result = {
        "detector_accuracy": detector_accuracy(detector),
        "base_model": model_safety(pipe, detector, args.n, args.steps, args.guidance, args.seed),
        "images_per_s": generation_speed(pipe, args.steps, args.guidance),
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.write:
        (WEIGHTS_DIR / "measurements.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
