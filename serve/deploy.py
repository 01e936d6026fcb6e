"""Deploy the aligned model on Ray Serve, on a running cluster: the stage and its command line.

The application (re)deploys in place: deploying again with another LoRA rolls the replicas over to
it. The endpoint stays up after the command exits; ``serve shutdown`` stops it. Keys come from this
process's environment (``serve.api_key_env``, ``serve.base_key_env``).
"""

from __future__ import annotations

import os
import time

from ray import serve

from safetydpo import cli, localcluster, tracking
from safetydpo.config import PROJECT_ROOT, Config
from safetydpo.model_ids import ModelCatalog
from serve.app import APP_NAME, MODEL_DEPLOYMENT, build_app


def deploy(config: Config) -> dict[str, float]:
    """Deploy (or update) the application on the Ray this process is connected to; returns summary numbers.

    Logs the endpoint, the merged LoRA's source and the deploy time to an MLflow child run ``deploy``.
    """
    merged = ModelCatalog.from_config(config).merged()
    with tracking.child_run("deploy"):
        started = time.perf_counter()
        serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        seconds = time.perf_counter() - started
        replicas = serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT].replica_states
        running = sum(count for state, count in replicas.items() if str(state) == "RUNNING")
        tracking.log_params({"serve/url": config.serve.url, "serve/merged": merged or "none"})
        tracking.log_metrics({"serve/deploy_s": seconds, "serve/replicas": running})
    print(f"serving {config.serve.url} (merged LoRA: {merged or 'none yet'}; {running} model replica(s), "
          f"{seconds:.1f} s)", flush=True)
    return {"serve/deploy_s": seconds, "serve/replicas": float(running)}


def main(argv: list[str] | None = None) -> int:
    """Deploy the aligned model on Ray Serve, on a running cluster."""
    p = cli.parser(main.__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--lora", help="the merged LoRA to serve (file or folder); sets serve.lora_path")
    source.add_argument("--mlflow-model", metavar="NAME@ALIAS",
                        help="a registered LoRA (NAME@ALIAS or NAME/VERSION); sets serve.mlflow_model")
    args = p.parse_args(argv)
    config = cli.load(p, args)
    if args.lora:  # a command-line path is relative to the current directory
        config.serve.lora_path = os.path.abspath(args.lora)
    if args.mlflow_model:
        config.serve.mlflow_model = args.mlflow_model
    localcluster.join_env(tracking_uri_configured=config.tracking.tracking_uri is not None)
    if not os.environ.get("RAY_ADDRESS"):
        p.error("no running Ray cluster: start one with `python cluster/local.py up` or set RAY_ADDRESS")
    # The project travels as the job's working dir, so replicas import serve.app on any node.
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": localcluster.RUNTIME_ENV_EXCLUDES}
    with cli.session(config, run_name=f"{config.name}-deploy", runtime_env=runtime_env) as parent:
        deploy(config)
    print(f"MLflow: {tracking.run_url(parent)}")
    return 0
