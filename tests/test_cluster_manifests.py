"""The cluster definitions in ``cluster/`` against the schemas that will judge them, without a cluster.

Nothing reads the KubeRay manifests, the launcher config or the Dockerfile before ``kubectl apply`` or
``ray up``, so a misspelt field, a Serve config that drifted from ``serve.config_gen``, a job that names a
missing config or a Ray version behind pyproject.toml would show only on a cluster. The manifests are
validated against KubeRay's CRDs from the shared data, as strictly as the API server's field validation
(an unknown field is an error), the launcher config against Ray's own ``ray-schema.json``.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from safetydpo.config import PROJECT_ROOT, load_config
from safetydpo.evaluation.benchmarks import shared_data_dir
from serve.config_gen import deploy_config

CLUSTER = PROJECT_ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "gpu-cluster.yaml"
CRD_DIR = shared_data_dir() / "kuberay"
# Each KubeRay manifest: its kind, its CRD file and where its RayCluster spec sits under ``spec``.
RAY_MANIFESTS = {
    "raycluster.yaml": ("RayCluster", "ray.io_rayclusters.yaml", ()),
    "rayjob.yaml": ("RayJob", "ray.io_rayjobs.yaml", ("rayClusterSpec",)),
    "rayservice.yaml": ("RayService", "ray.io_rayservices.yaml", ("rayClusterConfig",)),
}
SERVE_KEYS_SECRET = "safetydpo-serve-keys"
JOB_COMMAND = re.compile(r"python (jobs/\S+\.py)\b([^\n]*)")


def read_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def manifest(name: str) -> dict:
    return read_yaml(KUBERAY / name)


def cluster_spec(name: str) -> dict:
    spec = manifest(name)["spec"]
    for key in RAY_MANIFESTS[name][2]:
        spec = spec[key]
    return spec


def ray_containers(spec: dict) -> Iterator[dict]:
    """Every container of the head and worker pod templates (all of them run Ray here)."""
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def strict(schema: dict) -> dict:
    """``schema`` with unknown fields rejected wherever it lists the known ones, as the API server's strict
    field validation (kubectl's default) does; plain JSON Schema would accept them."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


@functools.cache
def crd_schema(crd_file: str) -> dict:
    """The ``v1`` openAPIV3Schema of a KubeRay CRD, made strict."""
    path = CRD_DIR / crd_file
    if not path.exists():
        pytest.skip(f"needs the KubeRay CRDs ({path})")
    crd = read_yaml(path)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def schema_errors(document: Any, schema: dict) -> list[str]:
    errors = jsonschema.Draft7Validator(schema).iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def pinned(package: str) -> str:
    """The lower bound pyproject.toml gives ``package`` (``"ray[...]>=X"``)."""
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(\[[^\]]*\])?>=([^",;\s]+)', text)
    assert match, f"pyproject.toml has no lower bound for {package}"
    return match.group(2)


def ray_version_of(image: str) -> str:
    """``rayproject/ray:2.60.0-py311-gpu`` and the project's ``...:ray2.60.0-gpu`` both run Ray 2.60.0."""
    match = re.search(r":(?:ray)?(\d+\.\d+\.\d+)", image)
    assert match, f"image {image} names no Ray version in its tag"
    return match.group(1)


def job_commands() -> list[tuple[str, str, list[str]]]:
    """``(manifest, script, arguments)`` of every ``python jobs/X.py ...`` in a string of a KubeRay manifest."""

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    return [(path.name, match.group(1), shlex.split(match.group(2)))
            for path in sorted(KUBERAY.glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text())
            for text in strings(document)
            for match in JOB_COMMAND.finditer(text)]


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_kuberay_manifest_validates_against_its_crd(name: str) -> None:
    kind, crd_file, _ = RAY_MANIFESTS[name]
    document = manifest(name)
    assert (document["apiVersion"], document["kind"]) == ("ray.io/v1", kind)
    assert document["metadata"]["namespace"] == "safetydpo"
    assert schema_errors(document, crd_schema(crd_file)) == []
    # The embedded cluster against the RayCluster CRD itself, should the two CRDs ever differ.
    assert schema_errors(cluster_spec(name), crd_schema("ray.io_rayclusters.yaml")["properties"]["spec"]) == []


def test_job_and_service_run_the_raycluster() -> None:
    """One cluster definition in three places: the job's is the RayCluster's, the service's adds the Serve keys."""
    cluster = cluster_spec("raycluster.yaml")
    assert cluster_spec("rayjob.yaml") == cluster
    service = cluster_spec("rayservice.yaml")
    for container in ray_containers(service):
        container["env"] = [e for e in container["env"]
                            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != SERVE_KEYS_SECRET]
    assert service == cluster


def test_service_serve_config_is_the_generated_one() -> None:
    """serveConfigV2 is ``serve.config_gen``'s document for its config and overrides; it listens on 0.0.0.0 and
    serves the run root the pipeline job writes."""
    served = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    (app,) = served["applications"]
    config_path, overrides = app["args"]["config"], app["args"].get("overrides", [])
    expected = deploy_config(load_config(PROJECT_ROOT / config_path, overrides), config_path, overrides)
    assert served["http_options"].pop("host") == "0.0.0.0"
    expected["http_options"].pop("host")
    assert served == expected

    (job,) = [args for name, _, args in job_commands() if name == "rayjob.yaml"]
    job_run_root = [a for a in job if a.startswith("run_root=")]
    assert job_run_root and job_run_root == [o for o in overrides if o.startswith("run_root=")]


def test_service_reads_its_keys_from_the_secret() -> None:
    """Every Ray container of the service has the config's key variables from the Secret, not optional: without
    the Secret the pods do not start, instead of serving an endpoint without a key."""
    served = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = served["applications"]
    config = load_config(PROJECT_ROOT / app["args"]["config"], app["args"].get("overrides", []))
    for container in ray_containers(cluster_spec("rayservice.yaml")):
        env = env_of(container)
        for variable in (config.serve.api_key_env, config.serve.base_key_env):
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SERVE_KEYS_SECRET and not ref.get("optional", False), (container["name"], variable)


def test_job_entrypoints_exist_and_their_configs_load() -> None:
    commands = job_commands()
    assert commands, "no `python jobs/...` command found in the manifests"
    for name, script, args in commands:
        assert (PROJECT_ROOT / script).is_file(), f"{name}: {script} does not exist"
        assert args[0] == "--config", f"{name}: {script} {args}: the config comes first"
        config_path = PROJECT_ROOT / args[1]
        assert config_path.is_file(), f"{name}: {args[1]} does not exist"
        load_config(config_path, args[2:])


def test_ray_versions_match_pyproject() -> None:
    """rayVersion, every Ray image and the Dockerfile's base are the Ray pyproject.toml requires; the MLflow
    server is the release of the project's MLflow client."""
    version = pinned("ray")
    (base,) = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert base.startswith("rayproject/ray:") and ray_version_of(base) == version
    launcher = read_yaml(LAUNCHER)["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in launcher:
            assert ray_version_of(launcher[key]) == version, f"launcher docker.{key}"
    for name in RAY_MANIFESTS:
        spec = cluster_spec(name)
        assert spec["rayVersion"] == version, name
        for container in ray_containers(spec):
            assert ray_version_of(container["image"]) == version, (name, container["name"])
    deployment = next(d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()) if d["kind"] == "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["image"].rsplit(":", 1)[1] == f"v{pinned('mlflow')}"


def test_token_auth_is_on_in_every_cluster() -> None:
    for name in RAY_MANIFESTS:
        spec = cluster_spec(name)
        assert spec.get("authOptions", {}).get("mode") == "token", name
        for container in ray_containers(spec):
            assert env_of(container)["RAY_AUTH_MODE"].get("value") == "token", (name, container["name"])
    launcher = read_yaml(LAUNCHER)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in launcher[key] if "ray start" in c]
    assert len(starts) == 2
    token_files = set(launcher["file_mounts"])
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command)
        assert token_path and token_path.group(1) in token_files, f"{command}: the token is not a file mount"


def test_ray_pods_log_to_the_mlflow_service() -> None:
    documents = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text())}
    service, deployment = documents["Service"], documents["Deployment"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    for name in RAY_MANIFESTS:
        for container in ray_containers(cluster_spec(name)):
            assert env_of(container)["MLFLOW_TRACKING_URI"].get("value") == url, (name, container["name"])


def test_launcher_config_validates_against_ray_schema() -> None:
    config = read_yaml(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    assert schema_errors(config, schema) == []
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, node types consistent
