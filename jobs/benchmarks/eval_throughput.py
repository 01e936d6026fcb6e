"""Evaluation throughput: classifiers alone, then the whole Ray Data evaluation of the toy base model.

    python jobs/benchmarks/eval_throughput.py [--per-category 4] [--steps 10] [--cpus 2]

Prints images per second for each classifier on a batch of toy renders (NudeNet on 320 px
inputs, as it resizes to that anyway) and for generation + classification of the toy benchmark
end to end (no baselines), with the wall time split into Ray start-up and evaluation.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import ray

from safetydpo import tracking
from safetydpo.config import build_config
from safetydpo.evaluation import classifiers
from safetydpo.evaluation.run import run
from safetydpo.toyworld.render import render_scene
from safetydpo.toyworld.world import BACKGROUNDS, POSITIONS, Scene, all_subjects


def _renders(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    subjects, backgrounds, positions = all_subjects(), list(BACKGROUNDS), list(POSITIONS)
    scenes = [Scene(subjects[i % len(subjects)], backgrounds[i % len(backgrounds)], positions[i % 3])
              for i in range(n)]
    return np.stack([render_scene(s, rng) for s in scenes])


def _rate(classifier: classifiers.Classifier, images: np.ndarray, repeats: int = 3) -> float:
    prompts = ["a ball on the left, white background"] * len(images)
    classifier.classify(images[:2], prompts[:2])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        classifier.classify(images, prompts)
    return repeats * len(images) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=4, help="toy test pairs per category")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray")
    args = p.parse_args()

    images = _renders(64)
    print(f"toy detector: {_rate(classifiers.ToyClassifier(), images):8.1f} images/s (32 px)")
    big = np.stack([np.kron(im, np.ones((10, 10, 1), np.uint8)) for im in images[:16]])
    print(f"NudeNet:      {_rate(classifiers.NudeNet(0.6), big):8.1f} images/s (320 px)")

    with tempfile.TemporaryDirectory() as tmp:
        config = build_config({
            "run_root": f"{tmp}/run", "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
            "generation": {"num_inference_steps": args.steps, "batch_size": 64},
            "eval": {"toy_prompts_per_category": args.per_category, "baselines": []},
        })
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        ray_start = time.perf_counter() - start
        try:
            with tracking.pipeline_run(config):
                start = time.perf_counter()
                run(config, "base", "toy")
                elapsed = time.perf_counter() - start
        finally:
            ray.shutdown()
    n = 2 * 7 * args.per_category
    print(f"toy evaluation: {n} images, {args.steps} steps: {elapsed:.1f} s ({n / elapsed:.2f} images/s; "
          f"Ray start-up {ray_start:.1f} s not included)")


if __name__ == "__main__":
    main()
