"""Which expert objective aligns the toy world: an ablation of the terms of ``safetydpo.dpo``.

    python jobs/benchmarks/expert_objectives.py --config jobs/configs/toy.yaml [--category Violence]
        [--variants dpo,dpo+sft,dpo+anchor,dpo+anchor+preserve,anchor+preserve] [--per-category 32]
        [--out runs/benchmarks/expert_objectives.json] [key.sub=value ...]

Every variant trains one LoRA expert for ``--category`` from the generation stage's pairs of
``config`` (rendered, or reused when already there) with the same batches, timesteps and noise,
in a plain loop over the Ray trainer's own step (``safetydpo.experts.probe``), then
renders the toy **validation** split and scores it with the toy detector: this script chooses objectives,
so it never sees the test split, which only the evaluation stage reports on. A variant is the config's ``dpo``
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
from safetydpo.experts.probe import PAIR_COLUMNS, train
from safetydpo.generation import generate_pairs
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
def score(config: Config, pipe, detector: ToyDetector, category: str, n: int) -> dict[str, float]:
    g = config.generation
    measured = model_safety(pipe, detector, n, g.num_inference_steps, g.guidance_scale, config.eval.seed,
                            split="validation")
    others = [measured["ip"][c] for c in CATEGORIES if c != category]
    return {"ip_own": measured["ip"][category], "ip_others": float(np.mean(others)),
            "redirect_own": measured["redirect"][category], "benign_fidelity": measured["benign_fidelity"]}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--category", default="Violence")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--per-category", type=int, default=32, help="validation pairs per category")
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
    table = read_pairs_pandas(pairs, columns=PAIR_COLUMNS)
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    own = train_rows[train_rows["category"].map(normalize_category) == category].reset_index(drop=True)
    detector = ToyDetector.from_pretrained(DETECTOR_DIR)
    print(f"{category}: {len(own)} training pairs, {len(train_rows)} safe twins for preservation; "
          f"validation {args.per_category} pairs per category", flush=True)

    results = [{"variant": "base", **score(config, load_pipeline(config.model), detector, category,
                                           args.per_category)}]
    print(results[-1], flush=True)
    for name in variants:
        dpo = DPOConfig(**(config.dpo.model_dump() | VARIANTS[name]))
        start = time.perf_counter()
        pipe = train(config, dpo, own, train_rows, args.seed)
        seconds = time.perf_counter() - start
        results.append({"variant": name, **score(config, pipe, detector, category, args.per_category),
                        "train_s": round(seconds, 1)})
        print(results[-1], flush=True)

    storage.write_json(args.out, {"category": category, "dpo": config.dpo.model_dump(), "variants": VARIANTS,
                                  "split": "validation", "per_category": args.per_category, "results": results})
    print(f"\n| variant | IP {category} | IP other 6 | redirect | benign fidelity |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['ip_own']:.2f} | {r['ip_others']:.2f} | {r['redirect_own']:.2f} | "
              f"{r['benign_fidelity']:.3f} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
