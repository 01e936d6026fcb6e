"""Does a DPO term make experts merge better? Seven experts per objective, merged, scored on validation.

    python jobs/benchmarks/merge_objectives.py --config jobs/configs/toy.yaml
        [--variants anchor+preserve,dpo50+anchor+preserve,dpo+anchor+preserve] [--scales 0.5,0.67,1]
        [--distill-steps 400] [--workers 2] [--out runs/benchmarks/merge_objectives.json] [key.sub=value ...]

For each variant (the config's ``dpo`` section with some terms changed), one expert per category is trained
in the plain loop over the Ray trainer's own step (``safetydpo.experts.probe``, same batches, timesteps and noise
for every variant; ``--workers`` processes of one thread each), saved under
``runs/benchmarks/merge_objectives/<variant>-<fingerprint of its dpo settings and pairs>/<category>/`` (reused
when there). Then, in one process: each expert alone, ``sum`` merges at each of ``--scales`` and, with
``--distill-steps``, the distillation of the ``sum`` at the first scale, each rendered on the toy **validation**
split (this script compares objectives, so it never sees the test split) and scored as the merge search scores a
trial. Prints one table; writes every metric to ``--out``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from safetydpo import cli, storage
from safetydpo.categories import CATEGORIES, category_slug
from safetydpo.config import PROJECT_ROOT, Config, DPOConfig
from safetydpo.data.pairs import read_pairs_pandas
from safetydpo.evaluation import inline
from safetydpo.evaluation.metrics import BENIGN_FIDELITY, IP, IP_OVERALL, REDIRECT_OVERALL, category_metric
from safetydpo.experts.probe import PAIR_COLUMNS, train
from safetydpo.generation import pairs_location
from safetydpo.lora import save_lora
from safetydpo.merge.build import MergeSettings, merge_with
from safetydpo.merge.distill import distill
from safetydpo.merge.lora_file import load_expert, save_merged

# Changes to the config's dpo section (the toy config is "dpo+anchor+preserve", beta 5000).
VARIANTS: dict[str, dict[str, float]] = {
    "anchor+preserve": {"beta": 1e-6},  # the DPO term without pull
    "dpo50+anchor+preserve": {"beta": 50.0},  # beta at the measured unit logit (README, the paper's objective)
    "dpo+anchor+preserve": {},
}
OUT_DIR = PROJECT_ROOT / "runs" / "benchmarks" / "merge_objectives"


def _train_one(config: Config, variant: str, category: str, seed: int) -> str:
    """Train (or reuse) one expert; its folder."""
    dpo = DPOConfig(**(config.dpo.model_dump() | VARIANTS[variant]))
    pairs = pairs_location(config)
    folder = OUT_DIR / f"{variant}-{storage.fingerprint(dpo.model_dump(), pairs, seed)}" / category_slug(category)
    if (folder / "pytorch_lora_weights.safetensors").exists():
        return str(folder)
    torch.set_num_threads(1)
    table = read_pairs_pandas(pairs, columns=PAIR_COLUMNS)
    rows = table[table["split"] == "train"].reset_index(drop=True)
    own = rows[rows["category"] == category].reset_index(drop=True)
    return save_lora(train(config, dpo, own, rows, seed).unet, str(folder))


def _scored(config: Config, table: pd.DataFrame, merged) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        return inline.score(config, table, save_merged(merged, folder))


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scales", default="0.5,0.67,1")
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "benchmarks" / "merge_objectives.json"))
    args = p.parse_args(argv)
    config = cli.load(p, args)
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = {(v, c): pool.submit(_train_one, config, v, c, args.seed) for v in variants for c in CATEGORIES}
        folders = {key: job.result() for key, job in jobs.items()}
    print(f"experts ready in {time.perf_counter() - start:.0f} s", flush=True)
    torch.set_num_threads(2)
    table, results = inline.validation_prompts(config), []
    for variant in variants:
        experts = {c: load_expert(c, folders[variant, c]) for c in CATEGORIES}
        alone = {c: inline.score(config, table, folders[variant, c]) for c in CATEGORIES}
        results.append({"variant": variant, "model": "each expert alone (its own category)",
                        "ip_own": {c: alone[c][category_metric(IP, c)] for c in CATEGORIES},
                        BENIGN_FIDELITY: min(a[BENIGN_FIDELITY] for a in alone.values())})
        print(results[-1], flush=True)
        scales = [float(s) for s in args.scales.split(",")]
        for scale in scales:
            merged = merge_with(config, MergeSettings("sum", scale=scale), experts)
            results.append({"variant": variant, "model": f"sum x {scale:g}", **_scored(config, table, merged)})
            print({k: v for k, v in results[-1].items() if k in ("variant", "model", IP_OVERALL, BENIGN_FIDELITY)},
                  flush=True)
            if args.distill_steps and scale == scales[0]:
                d = config.distill
                refined = distill(config, list(CATEGORIES), merged, steps=args.distill_steps, lr=d.learning_rate,
                                  batch_size=d.batch_size, seed=d.seed, winner_share=d.winner_share,
                                  expert_files={c: folders[variant, c] for c in CATEGORIES})
                results.append({"variant": variant, "model": f"sum x {scale:g}, distilled {args.distill_steps}",
                                **_scored(config, table, refined)})
                print({k: v for k, v in results[-1].items()
                       if k in ("variant", "model", IP_OVERALL, BENIGN_FIDELITY)}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"split": "validation", "variants": VARIANTS, "results": results}, indent=1))
    print("\n| objective | model | IP | benign fidelity | redirect |\n|---|---|---|---|---|")
    for r in results:
        if IP_OVERALL in r:
            print(f"| {r['variant']} | {r['model']} | {r[IP_OVERALL]:.3f} | {r[BENIGN_FIDELITY]:.3f} | "
                  f"{r[REDIRECT_OVERALL]:.3f} |")
        else:
            own = ", ".join(f"{c} {v:.2f}" for c, v in r["ip_own"].items())
            print(f"| {r['variant']} | {r['model']}: {own} | | >= {r[BENIGN_FIDELITY]:.3f} | |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
