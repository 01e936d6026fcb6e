"""Distillation settings side by side: one initial merge of a run root's experts, distilled under each setting,
scored on the validation split (never the test split).

    python jobs/benchmarks/distill_variants.py --config jobs/configs/toy.yaml [--init sum:0.67]
        [--variants winner_share=0,winner_share=0.5] [--threads 2] [key.sub=value ...]

Variants are comma-separated; each sets ``distill`` fields over the config's, joined by ``;``
(``winner_share=0.5;steps=400``). Prints one line per variant (seconds, validation IP, benign fidelity, redirect)
and writes every validation metric to ``runs/benchmarks/distill_variants.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from safetydpo import cli
from safetydpo.config import PROJECT_ROOT
from safetydpo.evaluation import inline
from safetydpo.evaluation.metrics import BENIGN_FIDELITY, IP_OVERALL, REDIRECT_OVERALL
from safetydpo.merge.build import MergeSettings, finished_experts, load_experts, merge_with
from safetydpo.merge.distill import distill
from safetydpo.merge.lora_file import save_merged


def main() -> None:
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--init", default="sum:0.67", help="method:lambda of the initial merge")
    p.add_argument("--variants", default="winner_share=0,winner_share=0.5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(PROJECT_ROOT / "runs/benchmarks/distill_variants.json"))
    args = p.parse_args()
    config = cli.load(p, args)
    torch.set_num_threads(args.threads)
    method, scale = args.init.split(":")
    init = merge_with(config, MergeSettings(method, scale=float(scale)), load_experts(config))
    table, experts = inline.validation_prompts(config), list(finished_experts(config))
    rows = {}
    for variant in args.variants.split(","):
        changes = {k: yaml.safe_load(v) for k, v in (item.split("=") for item in variant.split(";"))}
        d = config.distill.model_copy(update=changes)
        start = time.perf_counter()
        merged = distill(config, experts, init, steps=d.steps, lr=d.learning_rate, batch_size=d.batch_size,
                         seed=d.seed, winner_share=d.winner_share)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            scores = inline.score(config, table, save_merged(merged, folder))
        rows[variant] = {"seconds": seconds, **scores}
        print(f"{variant}: {seconds:.0f} s, IP {scores[IP_OVERALL]:.3f}, fidelity {scores[BENIGN_FIDELITY]:.3f}, "
              f"redirect {scores[REDIRECT_OVERALL]:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
