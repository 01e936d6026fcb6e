"""Throughput of the ``pairs/`` stage on Ray Data against a plain single-process diffusers loop.

    python jobs/benchmarks/generation_throughput.py [--pairs-per-category 32] [--steps 10] [--batch-size 16]

Same toy model, same prompts, same batch size, same seeds, and the same threads per renderer (an
actor's ``num_cpus``; Ray sets ``OMP_NUM_THREADS`` from it). Two numbers per run:

- end to end: the loop loads the pipeline and renders; the stage starts its actors (a fresh
  worker process that imports torch and diffusers and loads the pipeline), renders and writes
  the Parquet shards. Ray itself is started before any clock runs.
- steady state: images after the first batch / time from the first finished batch (the stage:
  its first shard file's time) to the end: the per-batch cost once the actors are up.

Prints a markdown table; the stage's one-actor images must equal the loop's bit for bit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from safetydpo.config import Config, build_config
from safetydpo.data.pairs import build_pairs, read_pairs_pandas
from safetydpo.generation import generate_pairs
from safetydpo.pipelines import load_pipeline, png_bytes
from safetydpo.rendering import render


def plain_loop(config: Config) -> tuple[float, float, list[bytes]]:
    """(end-to-end s, steady images/s, unsafe PNGs) of one process rendering every pair."""
    table = build_pairs(config.data).table
    g = config.generation
    start = time.time()
    pipe = load_pipeline(config.model)
    unsafe, first_done = [], None
    for first in range(0, len(table), g.batch_size):
        batch = table.iloc[first:first + g.batch_size]
        for column in ("unsafe_prompt", "safe_prompt"):
            pngs = [png_bytes(image) for image in render(
                pipe, batch[column].tolist(), batch["seed"].tolist(),
                num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale)]
            if column == "unsafe_prompt":
                unsafe.extend(pngs)
        first_done = first_done or time.time()
    end = time.time()
    after_first = 2 * (len(table) - min(g.batch_size, len(table)))
    return end - start, after_first / (end - first_done), unsafe


def ray_stage(config: Config, actors: int, root: Path) -> tuple[float, float, list[bytes]]:
    """(end-to-end s, steady images/s, unsafe PNGs) of the stage with ``actors`` actors."""
    config = config.model_copy(update={
        "run_root": str(root / f"actors-{actors}"),
        "generation": config.generation.model_copy(update={"num_actors": actors}),
    })
    start = time.time()
    path = generate_pairs(config)
    end = time.time()
    first = min(Path(path).glob("shard-*.parquet"), key=lambda f: f.stat().st_mtime)
    unsafe = read_pairs_pandas(path, columns=["unsafe_image"])["unsafe_image"].tolist()
    size = config.generation.batch_size
    after_first = 2 * (len(unsafe) - min(size, len(unsafe) - int(first.stem[-5:]) * size))
    return end - start, after_first / (end - first.stat().st_mtime), unsafe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs-per-category", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus-per-actor", type=int, default=1)
    args = p.parse_args()
    config = build_config({
        "data": {"toy_pairs_per_category": args.pairs_per_category, "val_fraction": 0.0},
        "generation": {"num_inference_steps": args.steps, "batch_size": args.batch_size,
                       "num_cpus_per_actor": args.cpus_per_actor},
    })
    pairs = len(build_pairs(config.data).table)
    images = 2 * pairs
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a private Ray, never a shared one
    torch.set_num_threads(args.cpus_per_actor)
    results = {"plain diffusers loop, 1 process": plain_loop(config)}
    with tempfile.TemporaryDirectory() as tmp:
        for actors in (1, 2):
            results[f"Ray Data stage, {actors} actor{'s' if actors > 1 else ''}"] = ray_stage(config, actors,
                                                                                            Path(tmp))
    ray.shutdown()

    loop_s, loop_steady, loop_images = results["plain diffusers loop, 1 process"]
    print(f"\n{pairs} pairs ({images} images), toy model, {args.steps} steps, batch {args.batch_size} pairs, "
          f"{args.cpus_per_actor} thread(s) per renderer, torch {torch.__version__}\n")
    print("| run | end-to-end s | images/s | vs loop | steady images/s | vs loop |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, steady, _) in results.items():
        print(f"| {name} | {seconds:.1f} | {images / seconds:.2f} | {loop_s / seconds:.2f} "
              f"| {steady:.2f} | {steady / loop_steady:.2f} |")
    one_actor = results["Ray Data stage, 1 actor"][2]
    print(f"\none-actor stage images identical to the loop's: {one_actor == loop_images}")


if __name__ == "__main__":
    main()
