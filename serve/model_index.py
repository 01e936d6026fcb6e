"""The ingress's answer to "does this model exist, and which adapter serves it", cached.

Every request names a model; checking it on the replica would let a stream of made-up ids cost registry
calls and adapter evictions there. The ingress checks instead, against the run root and the registry,
and keeps each answer, found or missing, for :data:`ANSWER_TTL_S` seconds. A registered model's versions
and aliases are read in one call per name and TTL, so made-up versions of a real name cost nothing more.

A registry alias is pinned to its version here (``mlflow:<name>/<version>`` is the adapter's multiplexed
id), so the replica caches adapters per version and a moved alias reaches the replicas within the TTL.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from safetydpo.model_ids import BASE, ModelCatalog, ModelUnavailable

ANSWER_TTL_S = 10.0  # how long a found or missing model id is answered from memory
MAX_ANSWERS = 4096  # ids remembered (least recently asked forgotten first)


class ExpiringCache:
    """A bounded LRU of values (or the exception a lookup raised) that expire ``ttl_s`` after they were
    computed; thread-safe (lookups run in worker threads)."""

    def __init__(self, ttl_s: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.size, self.clock = ttl_s, size, clock
        self.entries: OrderedDict[str, tuple[float, object, BaseException | None]] = OrderedDict()
        self.lock = threading.Lock()
        self.misses = 0  # lookups computed (for tests and logs)

    def get(self, key: str, compute: Callable[[], object]) -> object:
        now = self.clock()
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0] > now:
                self.entries.move_to_end(key)
                if entry[2] is not None:
                    raise entry[2]
                return entry[1]
        self.misses += 1
        try:
            value, error = compute(), None
        except ModelUnavailable as err:
            value, error = None, err
        with self.lock:
            self.entries[key] = (now + self.ttl_s, value, error)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        if error is not None:
            raise error
        return value


class ModelIndex:
    """Resolves a canonical model id to the multiplexed id of the adapter that serves it."""

    def __init__(self, catalog: ModelCatalog, ttl_s: float = ANSWER_TTL_S, size: int = MAX_ANSWERS) -> None:
        self.catalog = catalog
        self.answers = ExpiringCache(ttl_s, size)

    def adapter_id(self, model_id: str) -> str:
        """``base``, ``mlflow:<name>/<version>`` for a registry LoRA, else the model id itself;
        :class:`ModelUnavailable` (with a ``public`` message) when nothing is behind it."""
        return self.answers.get(model_id, lambda: self._adapter_id(model_id))

    def _adapter_id(self, model_id: str) -> str:
        if model_id == BASE:
            return BASE
        ref = self.catalog.resolve(model_id)
        source = ref.lora or ""
        if not source.startswith("models:/"):
            return ref.id
        name, sep, ref_ = source.removeprefix("models:/").replace("@", "/").partition("/")
        version = self.registered(name).get(ref_) if sep else None
        if version is None:
            raise ModelUnavailable(f"{source}: not in the model registry",
                                   public=f"{model_id}: not in the model registry")
        return f"mlflow:{name}/{version}"

    def registered(self, name: str) -> dict[str, str]:
        """Versions and aliases of registered model ``name``, each mapped to its version (one registry call
        per name and TTL; an unknown name has none)."""
        return self.answers.get(f"registry:{name}", lambda: self._registered(name))

    def _registered(self, name: str) -> dict[str, str]:
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient(tracking_uri=self.catalog.tracking_uri, registry_uri=self.catalog.tracking_uri)
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        versions = {str(v.version): str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
        return versions | {alias: str(version) for alias, version in (model.aliases or {}).items()}
