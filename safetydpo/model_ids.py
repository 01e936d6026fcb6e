"""Model ids: which model, and which LoRA file, a name like ``merged`` or ``expert:hate`` means.

One resolver for every consumer (evaluation, Serve, the merge search), so the answer to "which file
is this model" has one source of truth. Ids:

==============================  ===========================================  =====================
id                              what it is                                   ``eval/`` folder
==============================  ===========================================  =====================
``base``                        the model being aligned, no LoRA             ``base``
``negative_prompt``             base, the 7 category names as negative prompt ``negative_prompt``
``sld:<medium|strong|max>``     base through Safe Latent Diffusion           ``sld_<preset>``
``expert:<category|all>``       ``experts/<slug>/`` of the run root          ``expert_<slug>``
``merged:<method>``             ``merged/<method>/`` of the run root         ``merged_<method>``
``champion``                    the merge search's winner: registry alias, else ``merged/champion/``  ``champion``
``merged``                      the deployed safety LoRA (see :meth:`ModelCatalog.merged`)  as its source
``mlflow:<name>/<version|alias>``, ``models:/...``, ``runs:/...``  an MLflow LoRA  ``mlflow_<hash>``
a LoRA file or folder           that file                                    ``lora_<stem>_<hash>``
==============================  ===========================================  =====================

Resolving touches only the run root (does the file exist?); registry LoRAs are fetched by
:meth:`ModelCatalog.local_lora` when a consumer needs the bytes.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetydpo import layout, storage
from safetydpo.categories import ALL, CATEGORIES, category_slug, normalize_category
from safetydpo.config import REGISTERED_NAME, Config

BASE = "base"
CHAMPION = "champion"  # the merge search's winner: merged/champion/ and the registry alias
MERGED = "merged"
NEGATIVE_PROMPT = "negative_prompt"
NEGATIVE_PROMPT_TEXT = ", ".join(CATEGORIES)  # the negative-prompt baseline: the 7 category names
SLD_PRESETS = ("medium", "strong", "max")
_MLFLOW_REF = re.compile(f"^mlflow:(?P<name>{REGISTERED_NAME})/(?P<ref>{REGISTERED_NAME})$")
_MISSING = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # registry: no such model/version/alias


class ModelIdError(ValueError):
    """A string that is no model id."""


class ModelUnavailable(LookupError):
    """A well-formed model id with nothing behind it; the message says what is missing and what to run.

    ``public`` is the same without paths or the run root, for callers outside the cluster (Serve's clients).
    """

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message


class NotMergedYet(ModelUnavailable):
    """``merged`` asked for before any merged safety LoRA exists (a fresh clone, a pipeline still running)."""


NOT_MERGED_YET = ("no merged safety LoRA yet: run the pipeline (jobs/pipeline.py) to merge the experts, "
                  "or set serve.lora_path (a LoRA file) or serve.mlflow_model (NAME@ALIAS)")


@dataclass(frozen=True)
class ModelRef:
    """What a model id resolves to: the base pipeline plus at most one LoRA, negative prompt or SLD preset."""

    id: str  # the id as canonical: expert:<slug>, mlflow:<name>/<ref>, ...
    name: str  # its folder under eval/ and its column in reports
    lora: str | None = None  # LoRA file (path or storage URI) or an MLflow models:/ or runs:/ URI
    negative_prompt: str | None = None
    sld_preset: str | None = None
    categories: tuple[str, ...] = ()  # an expert's categories (canonical names); empty for any other model


def mlflow_uri(model_id: str) -> str:
    """``mlflow:name/3`` -> ``models:/name/3``; ``mlflow:name/champion`` -> ``models:/name@champion``."""
    match = _MLFLOW_REF.match(model_id)
    if match is None:
        raise ModelIdError(f"{model_id!r} is not of the form mlflow:<name>/<version or alias>")
    name, ref = match["name"], match["ref"]
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"


def registry_uri(spec: str) -> str:
    """``NAME@ALIAS`` or ``NAME/VERSION`` (``serve.mlflow_model``) as a ``models:/`` URI."""
    name, sep, alias = spec.partition("@")
    return mlflow_uri(f"mlflow:{name}/{alias}" if sep else f"mlflow:{spec}")


def expert_id(name: str) -> str:
    """``expert:<slug>`` for a category in any spelling (``Illegal Activity``, ``illegal_activity``) or ``all``."""
    if name.strip().lower() == ALL:
        return f"expert:{ALL}"
    try:
        return f"expert:{category_slug(name.replace('_', ' '))}"
    except ValueError as err:
        raise ModelIdError(str(err)) from None


def _is_registry(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


@dataclass(frozen=True)
class ModelCatalog:
    """Resolves model ids against one run root and the deployment's choice of safety LoRA."""

    run_root: str
    merge_methods: tuple[str, ...] = ()
    lora_path: str | None = None  # serve.lora_path
    mlflow_model: str | None = None  # serve.mlflow_model: NAME@ALIAS or NAME/VERSION
    tracking_uri: str | None = None
    registered_model: str | None = None  # tracking.registered_model: where the search registers its champion

    @classmethod
    def from_config(cls, config: Config) -> ModelCatalog:
        return cls(config.run_root, tuple(config.merge.methods), config.serve.lora_path,
                   config.serve.mlflow_model, config.tracking.tracking_uri, config.tracking.registered_model)

    def champion(self) -> str | None:
        """``models:/<registered_model>@champion`` when the registry has it, else ``merged/champion/``'s LoRA
        when the search wrote one; None before any search."""
        if self.registered_model:
            uri = registry_uri(f"{self.registered_model}@{CHAMPION}")
            try:
                self.check_registered(uri)
                return uri
            except ModelUnavailable:
                pass
        path = layout.lora_file(layout.merged_dir(self.run_root, CHAMPION))
        return path if storage.exists(path) else None

    def merged(self) -> str | None:
        """The deployed safety LoRA: ``serve.mlflow_model``, else ``serve.lora_path``, else the search's
        champion, else the first of ``merge.methods`` merged under the run root; None when there is none yet."""
        if self.mlflow_model:
            return registry_uri(self.mlflow_model)
        if self.lora_path:
            return layout.lora_file(self.lora_path)
        if champion := self.champion():
            return champion
        for method in self.merge_methods:
            candidate = layout.lora_file(layout.merged_dir(self.run_root, method))
            if storage.exists(candidate):
                return candidate
        return None

    def experts(self) -> dict[str, str]:
        """``expert:<slug>`` -> LoRA file, for every expert folder under the run root holding one."""
        root = layout.experts_dir(self.run_root)
        found = {}
        for folder in storage.list_dirs(root):
            try:
                model_id = expert_id(folder)
            except ModelIdError:
                continue  # not an expert folder (e.g. _ray)
            path = layout.lora_file(storage.join(root, folder))
            if storage.exists(path):
                found.setdefault(model_id, path)
        order = [expert_id(c) for c in (*CATEGORIES, ALL)]  # the categories' order, as in every report
        return dict(sorted(found.items(), key=lambda item: order.index(item[0])))

    def resolve(self, model: str) -> ModelRef:
        """The :class:`ModelRef` of ``model`` (see the module docstring for the ids).

        Raises :class:`ModelIdError` for a string that is no id and :class:`ModelUnavailable` for an id
        whose LoRA does not exist under the run root.
        """
        kind, _, arg = model.partition(":")
        if model in (BASE, NEGATIVE_PROMPT):
            return ModelRef(model, model, negative_prompt=NEGATIVE_PROMPT_TEXT if model == NEGATIVE_PROMPT else None)
        if kind == "sld":
            if arg not in SLD_PRESETS:
                raise ModelIdError(f"model {model!r}: SLD preset must be one of {SLD_PRESETS}")
            return ModelRef(model, f"sld_{arg}", sld_preset=arg)
        if kind == "expert":
            model_id = expert_id(arg)
            slug = model_id.partition(":")[2]
            path = layout.lora_file(layout.expert_dir(self.run_root, slug))
            categories = tuple(CATEGORIES) if slug == ALL else (normalize_category(slug.replace("_", " ")),)
            if not storage.exists(path):
                what = "all" if slug == ALL else repr(categories[0])
                todo = "run the experts stage (jobs/train_experts.py)"
                raise ModelUnavailable(f"no trained expert {what} under {self.run_root} (no {path}): {todo}",
                                       public=f"no trained expert {what}: {todo}")
            return ModelRef(model_id, f"expert_{slug}", lora=path, categories=categories)
        if model == CHAMPION:
            source = self.champion()
            if source is None:
                todo = "run the merge search (jobs/tune_merge.py or jobs/pipeline.py)"
                raise ModelUnavailable(f"no champion merge yet under {self.run_root} or in the registry: {todo}",
                                       public=f"no champion merge yet: {todo}")
            return ModelRef(CHAMPION, CHAMPION, lora=source)
        if kind == MERGED and arg:
            path = layout.lora_file(layout.merged_dir(self.run_root, arg))
            if not storage.exists(path):
                raise ModelUnavailable(f"no merge {arg!r} under {self.run_root} (no {path}): run the merge stage",
                                       public=f"no merge {arg!r}: run the merge stage")
            return ModelRef(model, f"merged_{arg}", lora=path)
        if model == MERGED:
            source = self.merged()
            if source is None:
                raise NotMergedYet(NOT_MERGED_YET)
            return ModelRef(MERGED, self._source_name(source), lora=source)
        if kind == "mlflow":
            uri = mlflow_uri(model)
            return ModelRef(model, self._source_name(uri), lora=uri)
        if _is_registry(model):
            return ModelRef(model, self._source_name(model), lora=model)
        path = Path(model)
        if path.is_dir():
            path = path / layout.LORA_WEIGHTS
        if not path.is_file():
            raise ModelIdError(f"model {model!r} is neither base, negative_prompt, sld:<preset>, "
                               "merged[:<method>], expert:<category>, mlflow:<name>/<ref>, an MLflow runs:/ or "
                               "models:/ URI, nor an existing LoRA path")
        return ModelRef(model, self._source_name(str(path)), lora=str(path))

    def _source_name(self, source: str) -> str:
        """The ``eval/`` folder of a LoRA source: ``champion``, ``merged_<method>``, ``mlflow_<hash>`` or
        ``lora_<stem>_<hash>``."""
        champions = {layout.lora_file(layout.merged_dir(self.run_root, CHAMPION))}
        if self.registered_model:
            champions.add(registry_uri(f"{self.registered_model}@{CHAMPION}"))
        if source in champions:
            return CHAMPION
        if _is_registry(source):
            return "mlflow_" + storage.fingerprint(source, length=8)
        for method in self.merge_methods:
            if source == layout.lora_file(layout.merged_dir(self.run_root, method)):
                return f"merged_{method}"
        path = Path(source)
        stem = path.parent.name if path.name == layout.LORA_WEIGHTS else path.stem
        return f"lora_{stem}_{storage.fingerprint(str(path.resolve()), length=6)}"

    def check_registered(self, uri: str):
        """The registered version a ``models:/`` URI names; :class:`ModelUnavailable` if there is none.

        Asks this catalog's store explicitly (the fluent API would use the process's default).
        """
        import mlflow
        from mlflow.exceptions import MlflowException

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

    def registry_file(self, source: str) -> str:
        """The artifact URI of the LoRA file behind a ``models:/`` (alias resolved to its version now) or
        ``runs:/`` URI."""
        import mlflow

        uri = source
        if source.startswith("models:/"):
            version = self.check_registered(source)
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            uri = client.get_model_version_download_uri(version.name, version.version)
        uri = uri.rstrip("/")
        return uri if uri.endswith("/" + layout.LORA_WEIGHTS) else f"{uri}/{layout.LORA_WEIGHTS}"

    def local_lora(self, source: str, cache_dir: str | None = None) -> str:
        """A local LoRA file for ``source``: the file itself, or a copy of only the LoRA file of a registry
        version or remote run root, under ``cache_dir/<fingerprint of its location>/`` (reused when there,
        written atomically; a new temporary folder when ``cache_dir`` is None)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        if not (_is_registry(source) or storage.is_remote(source)):
            if not Path(source).is_file():
                raise ModelUnavailable(f"LoRA file {source} does not exist", public="its LoRA file does not exist")
            return source
        location = self.registry_file(source) if _is_registry(source) else source
        folder = Path(cache_dir or tempfile.mkdtemp(prefix="lora-")) / storage.fingerprint(location, length=16)
        target = folder / layout.LORA_WEIGHTS
        if target.is_file():
            return str(target)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            if _is_registry(source):
                try:
                    fetched = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(partial),
                                                                  tracking_uri=self.tracking_uri)
                except (MlflowException, OSError) as err:
                    raise ModelUnavailable(f"{source}: no {layout.LORA_WEIGHTS} at {location}: {err}",
                                           public=f"the registered LoRA's {layout.LORA_WEIGHTS} cannot be "
                                                  "fetched") from None
                Path(fetched).replace(partial / layout.LORA_WEIGHTS)
            else:
                (partial / layout.LORA_WEIGHTS).write_bytes(storage.read_bytes(source))
            try:
                partial.replace(folder)
            except OSError:  # another loader finished first: use its copy
                if not target.is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return str(target)
