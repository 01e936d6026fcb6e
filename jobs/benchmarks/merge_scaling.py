"""How merging scales: time and peak memory vs the number of experts, and the Co-Merge statistics pass.

    python jobs/benchmarks/merge_scaling.py [--experts 1,7,28,100] [--methods linear,comerge_row,comerge,ties]
        [--calibration-config jobs/configs/toy.yaml] [--out runs/benchmarks/merge_scaling.json]

Part 1: N synthetic experts with SD 1.5's UNet LoRA shapes (rank 4 on ``to_q, to_k, to_v, to_out.0`` of
every attention layer; the UNet is built from its config on the meta device, so the shapes are exact and
no weights are loaded). Each (method, N) runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own.
Part 2, when the toy run root has finished experts: the time of Co-Merge's input statistics for all of
them (``base`` source: one pass serves every expert; ``own``: every expert's adapter on its own copy of the
inputs, batched in one pass, or looped) against one expert's pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from safetydpo.config import PROJECT_ROOT

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
METHOD = {"linear": ("linear", "weight"), "comerge_row": ("co_merge", "row"), "comerge": ("co_merge", "weight"),
          "ties": ("ties", "weight"), "dare_ties": ("dare_ties", "weight")}


def sd15_shapes() -> dict[str, tuple[int, int]]:
    """``unet.<module>`` -> (out, in) of every LoRA target of SD 1.5's UNet, from its config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    return {f"unet.{name}": (module.out_features, module.in_features) for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS)}


def one_merge(method: str, n: int) -> dict[str, float]:
    """Merge ``n`` random rank-4 experts with SD 1.5 shapes (in this process); time and peak RSS."""
    from safetydpo.merge.lora_file import ExpertLora, LoraFactors
    from safetydpo.merge.methods import merge

    generator = torch.Generator().manual_seed(0)
    shapes = sd15_shapes()
    experts = {f"e{i}": ExpertLora(f"e{i}", {layer: LoraFactors(torch.randn(4, i_, generator=generator) / 8,
                                                               torch.randn(o, 4, generator=generator) / 8)
                                             for layer, (o, i_) in shapes.items()}) for i in range(n)}
    name, granularity = METHOD[method]
    start = time.perf_counter()
    merged = merge(experts, name, granularity=granularity, rank=64 if name != "linear" else None)
    seconds = time.perf_counter() - start
    return {"method": method, "experts": n, "layers": len(shapes), "seconds": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "svd_error_max": round(max(merged.errors.values()), 3)}


def statistics_pass(config_path: str, repeats: int = 3) -> dict[str, float] | None:
    """Co-Merge's input statistics for the toy run root's experts, on one calibration batch (the best of
    ``repeats``; loading excluded): one expert's own pass, the base pass that serves every expert, and every
    expert's own inputs batched in one pass (peft mixed-batch) or looped (one pass per expert)."""
    from safetydpo import layout
    from safetydpo.config import load_config
    from safetydpo.experts import expert_dir
    from safetydpo.experts.spec import expert_slug
    from safetydpo.merge.build import calibration_rows, finished_experts, load_experts
    from safetydpo.merge.calibration import calibration_batch, input_statistics
    from safetydpo.pipelines import load_pipeline

    config = load_config(config_path)
    if len(finished_experts(config)) < 2:
        return None
    experts = load_experts(config)
    pipe = load_pipeline(config.model)
    rows = calibration_rows(config)
    modules = [layer.split(".", 1)[1] for layer in next(iter(experts.values())).layers]
    batch = calibration_batch(pipe, rows["unsafe_prompt"].tolist(), rows["unsafe_image"].tolist(),
                              config.merge.calibration_timesteps, config.merge.seed)
    slugs = [expert_slug(name) for name in experts]
    for name, slug in zip(experts, slugs, strict=True):
        pipe.load_lora_weights(layout.lora_file(expert_dir(config.run_root, name)), adapter_name=slug)

    def best(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    def looped() -> None:
        for slug in slugs:
            pipe.set_adapters(slug)
            input_statistics(pipe.unet, modules, batch)

    pipe.set_adapters(slugs[0])
    one = best(lambda: input_statistics(pipe.unet, modules, batch))
    own_looped = best(looped)
    pipe.set_adapters(slugs)
    own_batched = best(lambda: input_statistics(pipe.unet, modules, batch, adapters=slugs))
    pipe.disable_lora()
    base = best(lambda: input_statistics(pipe.unet, modules, batch))
    timings = {"base": base, "own_batched": own_batched, "own_looped": own_looped}
    return {"experts": len(experts), "samples": len(batch.timesteps), "one_expert_s": round(one, 3),
            **{f"{k}_s": round(v, 3) for k, v in timings.items()},
            **{f"{k}_vs_one_expert": round(v / one, 2) for k, v in timings.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="1,7,28,100")
    p.add_argument("--methods", default="linear,comerge_row,comerge,ties")
    p.add_argument("--max-ties-experts", type=int, default=28, help="peft's TIES is minutes per 100 experts on CPU")
    p.add_argument("--calibration-config", default=str(PROJECT_ROOT / "jobs/configs/toy.yaml"))
    p.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "benchmarks" / "merge_scaling.json"))
    p.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_merge(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for method in args.methods.split(","):
        for n in map(int, args.experts.split(",")):
            if method in ("ties", "dare_ties") and n > args.max_ties_experts:
                continue
            done = subprocess.run([sys.executable, __file__, "--one", method, str(n)], capture_output=True, text=True,
                                  check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"merge": rows, "statistics_pass": statistics_pass(args.calibration_config)}
    print(json.dumps(result["statistics_pass"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
