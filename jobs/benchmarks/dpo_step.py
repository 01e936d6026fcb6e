"""Benchmark the DPO step and expert throughput.

    python jobs/benchmarks/dpo_step.py [--pretrained toy] [--unet sd15 --latent-size 32]
                                       [--batch-sizes 1 4 16] [--steps 20] [--experts-per-hour] [--expert-steps 20]

1. **DPO step**: ours (reference = the same UNet with LoRA off) against the reference-style step of
   the official SafetyDPO / Diffusion-DPO code (reference = a deep-copied frozen UNet), on the same
   model and the same batch of latents and text states, LoRA rank 4, AdamW.

   *Memory* is what training holds at its peak: the UNet's weights plus everything the step adds
   (the copy, LoRA, optimiser state, activations); VAE and text encoder are left out, as both
   variants hold them alike. On CUDA it is ``torch.cuda.max_memory_allocated``. On CPU each variant
   runs in a fresh process in which glibc mmaps every block of 64 KiB or more
   (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes back to the OS and the resident set follows
   live tensor memory; the step's share is the kernel's resident high-water mark (``VmHWM``, reset
   through ``/proc/self/clear_refs`` once the model is loaded) minus the resident set at that reset.
   Python's and torch's own footprint is the same in both processes and cancels out.

   ``--unet sd15`` swaps in Stable Diffusion 1.5's UNet architecture (860M parameters) built from its
   config with random weights (nothing to download; values do not change memory or time), so the
   comparison also runs where weights, not activations, dominate, as they do on real models.
   ``--latent-size`` sets its latent side (SD 1.5: 64; smaller keeps CPU steps short).

   *Time* is the median step (forward, backward, optimiser) with both variants interleaved step by
   step in one process, so load from other processes falls on both alike.

2. **Experts per hour** (``--experts-per-hour``): the 7 category experts of a small toy pairs set,
   trained all at once (``experts.max_concurrent=7``) and one after another (``=1``) on a local
   Ray limited to 2 CPUs; each expert pays Ray Train's start-up, which concurrency overlaps.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from safetydpo.config import DPOConfig, ModelConfig, build_config
from safetydpo.dpo import dpo_step
from safetydpo.lora import add_lora
from safetydpo.pipelines import default_device, load_pipeline

BETA = 5000.0


def _model(args: argparse.Namespace, device: torch.device) -> tuple[UNet2DConditionModel, SchedulerMixin, int]:
    """(UNet, noise scheduler, text length) of ``--pretrained``, the UNet optionally swapped by ``--unet``."""
    pipe = load_pipeline(ModelConfig(pretrained=args.pretrained, dtype="float32"), device)
    unet = pipe.unet
    if args.unet == "sd15":  # UNet2DConditionModel's defaults are SD 1.x's blocks; SD 1.5 reads CLIP-L's 768-d states
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=args.latent_size, cross_attention_dim=768).to(device)
    return unet, pipe.scheduler, pipe.tokenizer.model_max_length


def _batch(unet, text_length: int, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random winner/loser latents and text states of the model's shapes (content does not change cost)."""
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(2, batch_size, unet.config.in_channels, size, size, generator=g).to(device)
    states = torch.randn(batch_size, text_length, unet.config.cross_attention_dim, generator=g).to(device)
    return latents[0], latents[1], states


def _train_step(unet, scheduler, batch, optimizer, reference=None) -> None:
    generator = torch.Generator(batch[0].device).manual_seed(1)
    out = dpo_step(unet, scheduler, *batch, beta=BETA, generator=generator, reference=reference)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(variant: str, args: argparse.Namespace, batch_size: int, steps: int) -> dict[str, float]:
    """Peak MiB of one variant (``ours`` or ``copy``): UNet weights + what the DPO steps add."""
    device = default_device()
    unet, scheduler, text_length = _model(args, device)
    batch = _batch(unet, text_length, batch_size, device)
    unet_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        start = _rss_kib("VmRSS") * 1024
    reference = copy.deepcopy(unet).requires_grad_(False).eval() if variant == "copy" else None
    optimizer = torch.optim.AdamW(add_lora(unet, DPOConfig()), lr=1e-4)
    for _ in range(steps):
        _train_step(unet, scheduler, batch, optimizer, reference)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    added = (peak - start) / 2**20
    return {"unet_mib": unet_mib, "added_mib": added, "peak_mib": unet_mib + added}


def measure_time(args: argparse.Namespace, batch_size: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median step milliseconds of both variants, interleaved in this process."""
    device = default_device()
    unet, scheduler, text_length = _model(args, device)
    batch = _batch(unet, text_length, batch_size, device)
    reference = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(add_lora(unet, DPOConfig()), lr=1e-4)
    times: dict[str, list[float]] = {"ours": [], "copy": []}
    for i in range(warmup + steps):
        for variant in ("ours", "copy") if i % 2 else ("copy", "ours"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _train_step(unet, scheduler, batch, optimizer, reference if variant == "copy" else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[variant].append((time.perf_counter() - start) * 1000)
    return {f"{v}_step_ms": statistics.median(t) for v, t in times.items()}


def _memory_in_subprocess(variant: str, args: argparse.Namespace, batch_size: int) -> dict[str, float]:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-of", variant, "--pretrained", args.pretrained, "--unet", args.unet,
           "--latent-size", str(args.latent_size), "--batch-sizes", str(batch_size), "--steps", str(args.memory_steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def dpo_step_benchmark(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for batch_size in args.batch_sizes:
        ours = _memory_in_subprocess("ours", args, batch_size)
        theirs = _memory_in_subprocess("copy", args, batch_size)
        timing = measure_time(args, batch_size, args.steps, args.warmup)
        rows.append({
            "batch_pairs": batch_size, "unet_mib": ours["unet_mib"],
            "ours_peak_mib": ours["peak_mib"], "copy_peak_mib": theirs["peak_mib"],
            "peak_ratio": ours["peak_mib"] / theirs["peak_mib"],
            "ours_added_mib": ours["added_mib"], "copy_added_mib": theirs["added_mib"],
            **timing, "time_ratio": timing["ours_step_ms"] / timing["copy_step_ms"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _experts_config(work: Path, at_once: int, args: argparse.Namespace):
    return build_config({
        "run_root": str(work / f"{at_once}-at-once"),
        "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
        "data": {"toy_pairs_per_category": args.pairs_per_category},
        "generation": {"num_inference_steps": 4},
        "dpo": {"max_steps": args.expert_steps, "batch_size": 8},
        # 7 x 0.125 CPU: seven experts fit on this machine at once
        "experts": {"max_concurrent": at_once, "cpus_per_worker": 0.125, "checkpoint_every": args.expert_steps},
    })


def experts_per_hour(args: argparse.Namespace) -> dict[str, float]:
    import ray

    from safetydpo import experts, tracking
    from safetydpo.experts.driver import concurrency
    from safetydpo.generation import generate_pairs

    work = Path(tempfile.mkdtemp(prefix="experts-bench-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    result: dict[str, float] = {}
    try:
        pairs = generate_pairs(_experts_config(work, 7, args))
        for at_once in (7, 1):
            config = _experts_config(work, at_once, args)
            assert concurrency(config, 7) == at_once
            start = time.perf_counter()
            with tracking.pipeline_run(config, run_name=f"bench-{at_once}"):
                records = experts.train_experts(config, pairs=pairs)
            seconds = time.perf_counter() - start
            assert all(r["status"] == "trained" for r in records.values()), records
            result |= {f"wall_s_{at_once}_at_once": seconds, f"experts_per_hour_{at_once}_at_once": 7 * 3600 / seconds}
            print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    result["speedup"] = result["experts_per_hour_7_at_once"] / result["experts_per_hour_1_at_once"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="toy", help="'toy' or a diffusers model folder / hub id")
    p.add_argument("--unet", choices=["pretrained", "sd15"], default="pretrained",
                   help="sd15: SD 1.5's UNet architecture from its config, random weights")
    p.add_argument("--latent-size", type=int, default=64, help="latent side of --unet sd15")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="pairs per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--memory-steps", type=int, default=3, help="steps run while measuring peak memory")
    p.add_argument("--experts-per-hour", action="store_true",
                   help="also time 7 experts trained at once against one after another")
    p.add_argument("--expert-steps", type=int, default=20)
    p.add_argument("--pairs-per-category", type=int, default=16)
    p.add_argument("--memory-of", choices=["ours", "copy"], help=argparse.SUPPRESS)  # subprocess mode
    args = p.parse_args(argv)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args, args.batch_sizes[0], args.steps)))
        return 0
    print(f"device: {default_device()}, torch threads: {torch.get_num_threads()}", flush=True)
    rows = dpo_step_benchmark(args)
    print("\n| pairs/step | UNet MiB | ours peak MiB | copy peak MiB | peak ratio "
          "| ours ms | copy ms | time ratio |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_pairs']} | {r['unet_mib']:.1f} | {r['ours_peak_mib']:.1f} "
              f"| {r['copy_peak_mib']:.1f} | {r['peak_ratio']:.2f} | {r['ours_step_ms']:.1f} "
              f"| {r['copy_step_ms']:.1f} | {r['time_ratio']:.3f} |")
    if args.experts_per_hour:
        print(json.dumps(experts_per_hour(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
