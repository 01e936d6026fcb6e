"""Load benchmark of the Serve deployment: throughput and p50/p99 latency at concurrency 1, 4, 16.

    python jobs/benchmarks/serve_load.py --config jobs/configs/toy.yaml [--requests 16]
        [--max-seconds 60] [--out runs/benchmarks/serve_load.json] [key.sub=value ...]

Ways to get one PNG for a prompt, each driven closed-loop by N clients (N = concurrency): Serve
with batching (the replica's RenderQueue, after waiting ``serve.batch_wait_timeout_s``, or 5 ms,
for Serve's batch to fill), Serve without (one image per call), and the pipeline called in-process
under a lock (the floor: no HTTP, no actors; measured with Ray and Serve started, as the other
modes are). Serve's overhead is also measured paired: in-process and served calls in turn, so both
see the same background load. Load stays on 127.0.0.1; a cell sends max(``requests``, 4 N)
requests or stops after ``max-seconds``.
Every request renders one image with the config's steps and guidance; the model is the merged
LoRA when the run root has one, else the base model (with a throwaway base key).
Targets: Serve's p50 at concurrency 1 within 15 ms of in-process; batching >= 2x the
throughput of no batching at concurrency 16.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import requests
import torch
from ray import serve

from safetydpo import cli, storage
from safetydpo.config import PROJECT_ROOT, Config
from safetydpo.model_ids import ModelCatalog
from safetydpo.pipelines import load_pipeline, png_bytes
from safetydpo.rendering import render
from serve.app import APP_NAME, build_app

CONCURRENCY = (1, 4, 16)
PROMPT = "a ball on the right, lavender background"
HOST = "127.0.0.1"
WARM_UP_S = 10.0  # unmeasured requests before each mode: a fresh 2-core Ray is busy starting for a while


def closed_loop(call: Callable[[int], None], concurrency: int, total: int, max_seconds: float) -> dict:
    """``concurrency`` clients calling ``call(seed)`` back to back: latency percentiles and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    per_client = -(-total // concurrency)

    def client(index: int) -> None:
        for k in range(per_client):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                call(index * 10_000 + k)
            except Exception as err:  # counted and reported, the run goes on
                errors.append(f"{type(err).__name__}: {err}"[:200])
                continue
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = 1000 * np.asarray(latencies)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def warm_up(call: Callable[[int], None], seconds: float) -> None:
    """Requests one after another for ``seconds``, unmeasured."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        call(0)


def interleaved(floor: Callable[[int], None], served: Callable[[int], None], pairs: int) -> dict:
    """Serve's overhead at concurrency 1, paired: one in-process and one served call in turn, same
    seed, so both meet the same background load (on 2 cores, Ray's own work drifts between cells)."""
    floor_ms, served_ms = [], []
    for seed in range(pairs):
        for call, times in ((floor, floor_ms), (served, served_ms)):
            start = time.perf_counter()
            call(seed)
            times.append((time.perf_counter() - start) * 1000)
    deltas = np.subtract(served_ms, floor_ms)
    return {"pairs": pairs, "in_process_p50_ms": round(float(np.median(floor_ms)), 1),
            "served_p50_ms": round(float(np.median(served_ms)), 1),
            "overhead_p50_ms": round(float(np.median(deltas)), 1)}


def in_process(config: Config, lora: str | None) -> Callable[[int], None]:
    """The floor: the same render + PNG encode as a replica, in this process, one call at a time."""
    pipe = load_pipeline(config.model)
    if lora:
        pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
    lock = threading.Lock()
    gen = config.generation

    def call(seed: int) -> None:
        with lock:
            image = render(pipe, [PROMPT], [seed], num_inference_steps=gen.num_inference_steps,
                           guidance_scale=gen.guidance_scale, negative_prompt=gen.negative_prompt)[0]
        png_bytes(image)

    return call


def over_http(url: str, model: str, key: str | None) -> Callable[[int], None]:
    """One keep-alive session per client thread, like a real client pool."""
    local = threading.local()
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(seed: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = {"prompt": PROMPT, "model": model, "seed": seed, "response_format": "png"}
        response = local.session.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")

    return call


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _table(rows: list[dict]) -> str:
    lines = ["| mode | concurrency | requests | errors | throughput (img/s) | p50 (ms) | p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} |")
    return "\n".join(lines)


def verdicts(rows: list[dict], paired: dict) -> dict[str, dict]:
    """The two targets, measured."""
    cell = {(r["mode"], r["concurrency"]): r for r in rows}
    out: dict[str, dict] = {"overhead_c1/serve-batched, interleaved with in-process": {
        "ms": paired["overhead_p50_ms"], "target_ms": 15, "met": paired["overhead_p50_ms"] <= 15}}
    floor_p50 = cell[("in-process", 1)]["p50_ms"]
    for mode in ("serve-batched", "serve-batched-wait5ms", "serve-unbatched"):
        p50 = cell[(mode, 1)]["p50_ms"]
        overhead = None if p50 is None or floor_p50 is None else round(p50 - floor_p50, 1)
        met = overhead is not None and overhead <= 15
        out[f"overhead_c1/{mode}"] = {"ms": overhead, "target_ms": 15, "met": met}
    unbatched = cell[("serve-unbatched", 16)]["throughput_rps"]
    for mode in ("serve-batched", "serve-batched-wait5ms"):
        ratio = round(cell[(mode, 16)]["throughput_rps"] / unbatched, 2) if unbatched else None
        met = ratio is not None and ratio >= 2.0
        out[f"batching_gain_c16/{mode}"] = {"ratio": ratio, "target": 2.0, "met": met}
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16, help="per cell, at least 4 per client")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per cell")
    p.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "benchmarks" / "serve_load.json"))
    args = p.parse_args(argv)
    config = cli.load(p, args)
    lora = ModelCatalog.from_config(config).merged()
    model, key = ("merged", None) if lora else ("base", secrets.token_hex(32))
    if key:
        os.environ[config.serve.base_key_env] = key
    os.environ.pop(config.serve.api_key_env, None)
    # Replicas get OMP_NUM_THREADS = their CPUs; the in-process floor uses as many threads.
    torch.set_num_threads(max(1, int(config.serve.num_cpus)))
    print(f"model {model} ({lora or 'no LoRA'}), {config.generation.num_inference_steps} steps, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", flush=True)

    rows, paired = [], {}

    def measure(mode: str, call: Callable[[int], None]) -> None:
        for c in CONCURRENCY:
            rows.append({"mode": mode, **closed_loop(call, c, max(args.requests, 4 * c), args.max_seconds)})
            print(rows[-1], flush=True)

    ray.init(address="local", include_dashboard=False)
    port = _free_port()
    url = f"http://{HOST}:{port}"
    serve.start(http_options={"host": HOST, "port": port})
    try:
        # The floor runs with Ray and Serve's controller and proxy up, as every Serve mode does: on a
        # small machine their background work would otherwise count as Serve's overhead.
        floor = in_process(config, lora)
        warm_up(floor, WARM_UP_S)
        measure("in-process", floor)
        size, config_wait = config.serve.max_batch_size, config.serve.batch_wait_timeout_s
        variants = [("serve-batched", size, config_wait), ("serve-batched-wait5ms", size, 0.005),
                    ("serve-unbatched", 1, config_wait)]
        for mode, batch, wait in variants:
            variant = config.model_copy(deep=True)
            variant.serve.max_batch_size, variant.serve.batch_wait_timeout_s = batch, wait
            if batch == 1:  # a replica's batch must also hold one request's n images
                variant.serve.max_images = 1
            serve.run(build_app(variant), name=APP_NAME, route_prefix="/")
            call = over_http(url, model, key)
            warm_up(call, WARM_UP_S)  # loads the adapter and lets the new replicas' start-up work settle
            measure(mode, call)
            if mode == "serve-batched":
                paired = interleaved(floor, call, max(args.requests, 20))
                print({"interleaved": paired}, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {"rows": rows, "interleaved_c1": paired, "targets": verdicts(rows, paired), "model": model,
              "cpus": os.cpu_count(), "steps": config.generation.num_inference_steps,
              "max_batch_size": config.serve.max_batch_size,
              "batch_wait_timeout_s": config.serve.batch_wait_timeout_s}
    storage.write_json(args.out, result)
    print("\n" + _table(rows))
    for name, verdict in result["targets"].items():
        print(f"{name}: {verdict}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
