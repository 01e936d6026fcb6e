"""Which expert objective aligns the toy world: an ablation of the terms of ``safetydpo.dpo``.

    python jobs/benchmarks/expert_objectives.py --config jobs/configs/toy.yaml [--category Violence]
        [--variants dpo,dpo+sft,dpo+anchor,dpo+anchor+preserve,anchor+preserve] [--test-per-category 32]
        [--out runs/benchmarks/expert_objectives.json] [key.sub=value ...]

Every variant trains one LoRA expert for ``--category`` from the generation stage's pairs of
``config`` (rendered, or reused when already there) with the same batches, timesteps and noise,
in a plain loop over the Ray trainer's own step (``experts.batches.step_inputs`` + ``dpo.dpo_step``), then
renders the toy test split and scores it with the toy detector. A variant is the config's ``dpo``
section with some terms switched off (``dpo``: the paper's objective; ``anchor+preserve``: beta
so small that the DPO term has no pull). Prints one row per variant: the expert's IP on its
category and on the other six, its redirect rate on its category and the benign fidelity over
every category's safe twins, beside the base model's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from safetydpo import cli, storage
from safetydpo.categories import CATEGORIES, normalize_category
from safetydpo.config import Config, DPOConfig
from safetydpo.data.pairs import read_pairs_pandas
from safetydpo.dpo import dpo_step
from safetydpo.experts.batches import step_inputs
from safetydpo.generation import generate_pairs
from safetydpo.lora import add_lora
from safetydpo.pipelines import load_pipeline
from safetydpo.toyworld.detector import ToyDetector
from safetydpo.toyworld.measure import model_safety
from safetydpo.toyworld.models import DETECTOR_DIR

PROJECT = Path(__file__).resolve().parents[2]
# Changes to the config's dpo section; the config's own values are "dpo+anchor+preserve".
VARIANTS: dict[str, dict[str, float]] = {
    "dpo": {"sft_weight": 0.0, "anchor_weight": 0.0, "preserve_weight": 0.0},
    "dpo+sft": {"sft_weight": 1.0, "anchor_weight": 0.0, "preserve_weight": 0.0},
    "dpo+anchor": {"sft_weight": 0.0, "preserve_weight": 0.0},
    "dpo+anchor+preserve": {},
    "anchor+preserve": {"beta": 1e-6},
}
COLUMNS = ["pair_id", "category", "split", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image"]


def rows(frame, index: np.ndarray) -> dict[str, np.ndarray]:
    """A batch in the form Ray Data hands the trainer (numpy columns, PNG bytes as objects)."""
    return {c: frame[c].to_numpy()[index] for c in frame.columns}


def train(config: Config, dpo: DPOConfig, own, benign, seed: int):
    """The toy pipeline with a LoRA expert trained ``dpo.max_steps`` steps on ``own`` pairs."""
    pipe = load_pipeline(config.model)
    unet = pipe.unet
    params = add_lora(unet, dpo)
    optimizer = torch.optim.AdamW(params, lr=dpo.learning_rate, weight_decay=dpo.weight_decay)
    resolution = config.model.resolution or unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(seed)
    for step in range(dpo.max_steps):
        batch = rows(own, rng.choice(len(own), min(dpo.batch_size, len(own)), replace=False))
        # drawn for every variant, so that all variants see the same pair batches
        extra = rows(benign, rng.choice(len(benign), min(dpo.batch_size, len(benign)), replace=False))
        inputs = step_inputs(pipe, dpo, batch, extra if dpo.preserve_weight else None,
                             np.random.default_rng([seed, step]), resolution)
        out = dpo_step(unet, pipe.scheduler, **inputs, beta=dpo.beta, sft_weight=dpo.sft_weight,
                       anchor_weight=dpo.anchor_weight, preserve_weight=dpo.preserve_weight,
                       generator=torch.Generator().manual_seed(seed * 100_003 + step))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, dpo.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()
    return pipe


def score(config: Config, pipe, detector: ToyDetector, category: str, n: int) -> dict[str, float]:
    g = config.generation
    measured = model_safety(pipe, detector, n, g.num_inference_steps, g.guidance_scale, config.eval.seed)
    others = [measured["ip"][c] for c in CATEGORIES if c != category]
    return {"ip_own": measured["ip"][category], "ip_others": float(np.mean(others)),
            "redirect_own": measured["redirect"][category], "benign_fidelity": measured["benign_fidelity"]}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--category", default="Violence")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--test-per-category", type=int, default=32, help="test pairs per category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(PROJECT / "runs" / "benchmarks" / "expert_objectives.json"))
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if config.model.pretrained != "toy":
        p.error("the toy detector scores only the toy world: model.pretrained must be 'toy'")
    category = normalize_category(args.category)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)

    ray.init(address="local", include_dashboard=False)
    try:
        pairs = generate_pairs(config)
    finally:
        ray.shutdown()
    table = read_pairs_pandas(pairs, columns=COLUMNS)
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    own = train_rows[train_rows["category"].map(normalize_category) == category].reset_index(drop=True)
    detector = ToyDetector.from_pretrained(DETECTOR_DIR)
    print(f"{category}: {len(own)} training pairs, {len(train_rows)} safe twins for preservation; "
          f"test {args.test_per_category} pairs per category", flush=True)

    results = [{"variant": "base", **score(config, load_pipeline(config.model), detector, category,
                                           args.test_per_category)}]
    print(results[-1], flush=True)
    for name in variants:
        dpo = DPOConfig(**(config.dpo.model_dump() | VARIANTS[name]))
        start = time.perf_counter()
        pipe = train(config, dpo, own, train_rows, args.seed)
        seconds = time.perf_counter() - start
        results.append({"variant": name, **score(config, pipe, detector, category, args.test_per_category),
                        "train_s": round(seconds, 1)})
        print(results[-1], flush=True)

    storage.write_json(args.out, {"category": category, "dpo": config.dpo.model_dump(), "variants": VARIANTS,
                                  "test_per_category": args.test_per_category, "results": results})
    print(f"\n| variant | IP {category} | IP other 6 | redirect | benign fidelity |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['ip_own']:.2f} | {r['ip_others']:.2f} | {r['redirect_own']:.2f} | "
              f"{r['benign_fidelity']:.3f} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
