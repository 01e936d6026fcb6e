"""Where each served model's LoRA comes from, and what its evaluation measured.

``merged`` is the configured safety LoRA (``serve.mlflow_model``, else ``serve.lora_path``, else
the run root's ``merged/<method>/``); ``expert:<slug>`` are the experts found under
``<run_root>/experts/``; ``mlflow:<name>/<version|alias>`` are registered LoRAs fetched on demand.
Everything is looked up when asked, so experts trained after the deployment started are served.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from safetydpo import storage
from safetydpo.categories import normalize_category
from safetydpo.config import Config
from serve.schemas import ALL_EXPERT, BASE, MERGED, canonical_model_id, mlflow_uri

logger = logging.getLogger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
_MISSING = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # registry: no such model/version/alias


class ModelUnavailable(LookupError):
    """A well-formed model id with nothing to serve behind it; the message says what is missing."""


def lora_file(path: str) -> str:
    """The LoRA file of ``path``: the file itself, or ``path/pytorch_lora_weights.safetensors``."""
    return path if path.endswith(".safetensors") else storage.join(path, LORA_FILE)


def registry_uri(spec: str) -> str:
    """``NAME@ALIAS`` or ``NAME/VERSION`` (``serve.mlflow_model``) as a ``models:/`` URI."""
    name, sep, alias = spec.partition("@")
    if sep:
        return mlflow_uri(f"mlflow:{name}/{alias}")
    return mlflow_uri(f"mlflow:{spec}")


def _list_dirs(root: str) -> list[str]:
    """Names of the folders directly under ``root`` (local or storage URI); [] when it does not exist."""
    if storage.is_remote(root):
        fs, path = pafs.FileSystem.from_uri(root)
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(root.removeprefix("file://")).resolve())
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)


def _expert_id(folder: str) -> str | None:
    if folder.lower() == ALL_EXPERT:
        return f"expert:{ALL_EXPERT}"
    try:
        return canonical_model_id(f"expert:{normalize_category(folder.replace('_', ' '))}")
    except ValueError:
        return None  # not an expert folder


@dataclass(frozen=True)
class Catalog:
    """Resolves model ids to LoRA sources for one deployment's config."""

    run_root: str
    merge_methods: tuple[str, ...]
    lora_path: str | None
    mlflow_model: str | None
    benchmarks: tuple[str, ...]
    tracking_uri: str | None

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        return cls(config.run_root, tuple(config.merge.methods), config.serve.lora_path,
                   config.serve.mlflow_model, tuple(config.eval.benchmarks), config.tracking.tracking_uri)

    def merged(self) -> str | None:
        """The merged LoRA: a ``models:/`` URI or a LoRA file; None when there is none yet."""
        if self.mlflow_model:
            return registry_uri(self.mlflow_model)
        if self.lora_path:
            return lora_file(self.lora_path)
        for method in self.merge_methods:
            candidate = storage.join(self.run_root, "merged", method, LORA_FILE)
            if storage.exists(candidate):
                return candidate
        return None

    def experts(self) -> dict[str, str]:
        """``expert:<slug>`` -> LoRA file, for every expert folder under the run root holding one."""
        root = storage.join(self.run_root, "experts")
        found = {}
        for folder in _list_dirs(root):
            model_id = _expert_id(folder)
            path = storage.join(root, folder, LORA_FILE)
            if model_id and storage.exists(path):
                found.setdefault(model_id, path)
        return found

    def source(self, model_id: str) -> str | None:
        """LoRA file or ``models:/`` URI of ``model_id`` (None: the base model, no LoRA).

        Raises :class:`ModelUnavailable` when nothing backs the id. Registry ids are checked
        against the registry, which is the caller's network round trip.
        """
        if model_id == BASE:
            return None
        if model_id == MERGED:
            merged = self.merged()
            if merged is None:
                raise ModelUnavailable("no merged safety LoRA yet: set serve.lora_path or "
                                       "serve.mlflow_model, or run the merge stage")
            return merged
        if model_id.startswith("expert:"):
            experts = self.experts()
            if model_id not in experts:
                raise ModelUnavailable(f"no trained {model_id} under {self.run_root}; have {sorted(experts)}")
            return experts[model_id]
        uri = mlflow_uri(model_id)
        self.check_registered(uri)
        return uri

    def check_registered(self, uri: str) -> ModelVersion:
        """The registered version a ``models:/`` URI names; :class:`ModelUnavailable` if there is none.

        Asks this deployment's store explicitly (the fluent API would use the process's default).
        """
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        name, _, version = uri.removeprefix("models:/").partition("/")
        try:
            if version:
                return client.get_model_version(name, version)
            name, _, alias = name.partition("@")
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code in _MISSING:
                raise ModelUnavailable(f"{uri}: not in the model registry") from None
            raise

    def local_lora(self, source: str, cache_dir: str) -> str:
        """A local LoRA file for ``source``: downloaded from the registry or a remote run root if need be."""
        if source.startswith("models:/"):
            version = self.check_registered(source)
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            dst = tempfile.mkdtemp(prefix="lora-", dir=cache_dir)
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=client.get_model_version_download_uri(version.name, version.version),
                    dst_path=dst, tracking_uri=self.tracking_uri)
            except MlflowException as err:
                raise ModelUnavailable(f"{source}: {err.message}") from None
            found = sorted(Path(local).rglob(LORA_FILE))
            if not found:
                raise ModelUnavailable(f"{source}: the registered artifacts hold no {LORA_FILE}")
            return str(found[0])
        if storage.is_remote(source):
            local = Path(tempfile.mkdtemp(prefix="lora-", dir=cache_dir)) / LORA_FILE
            storage.write_bytes(str(local), storage.read_bytes(source))
            return str(local)
        if not Path(source).is_file():
            raise ModelUnavailable(f"LoRA file {source} does not exist")
        return source

    def eval_name(self, model_id: str) -> str | None:
        """The folder under ``eval/`` where ``jobs/evaluate.py`` puts this model's results.

        Mirrors the names ``safetydpo.evaluation.run.resolve_model`` gives: ``base``,
        ``expert_<slug>``, ``merged_<method>``, ``mlflow_<fingerprint of the models:/ URI>`` and
        ``lora_<folder>_<fingerprint of the path>``. None when ``merged`` has no LoRA yet.
        """
        if model_id == BASE:
            return BASE
        if model_id.startswith("expert:"):
            return "expert_" + model_id.partition(":")[2]
        source = self.merged() if model_id == MERGED else mlflow_uri(model_id)
        if source is None:
            return None
        if source.startswith("models:/"):
            return "mlflow_" + storage.fingerprint(source, length=8)
        for method in self.merge_methods:
            if source == storage.join(self.run_root, "merged", method, LORA_FILE):
                return f"merged_{method}"
        path = Path(source)
        stem = path.parent.name if path.name == LORA_FILE else path.stem
        return f"lora_{stem}_{storage.fingerprint(str(path.resolve()), length=6)}"

    def metrics(self, model_id: str) -> dict[str, float] | None:
        """Finite numbers of the model's ``eval/<name>/<benchmark>/metrics.json``, first configured
        benchmark found (``ip/overall``, ``ip/<slug>``...); None when it was not evaluated."""
        name = self.eval_name(model_id)
        for benchmark in self.benchmarks if name else ():
            path = storage.join(self.run_root, "eval", name, benchmark, "metrics.json")
            if storage.exists(path):
                try:
                    raw = storage.read_json(path)
                    return {k: float(v) for k, v in raw.items()
                            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
                except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, not a mapping
                    logger.warning("ignoring %s: %s", path, err)
        return None
