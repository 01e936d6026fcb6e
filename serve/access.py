"""Who may use which model: the endpoint's two keys, the start-up rules they must pass, and the model ids
an anonymous caller can reach.

Two keys, both read from the environment of the process that builds the application and carried into
the deployments as SHA-256 digests (no key lands in the cluster's metadata):

- the **endpoint key** (``serve.api_key_env``) opens the endpoint, for the aligned models only;
- the **operator key** (``serve.base_key_env``) also opens the *operator models*: ``base`` (unaligned),
  ``expert:<category>`` (aligned for one category, as unsafe as the base on the other six) and every
  registered LoRA other than the configured one (``tracking.registered_model``, ``serve.mlflow_model``).

Keys fail closed: a key variable that is set must hold at least :data:`MIN_KEY_CHARS` characters, the two
keys must differ, and an endpoint bound to anything but loopback refuses to start without an endpoint key
unless ``serve.allow_anonymous`` says so.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from safetydpo.config import ServeConfig, TrackingConfig
from safetydpo.model_ids import CHAMPION, MERGED

MIN_KEY_CHARS = 32  # `openssl rand -hex 32` gives 64
PUBLIC_IDS = (MERGED, CHAMPION)  # the deployed aligned model(s)


class KeyPolicyError(ValueError):
    """The endpoint's keys or bind address would serve more than the configuration allows."""


def digest(secret: str | None) -> str | None:
    """SHA-256 of a key: deployments hold digests, so no key is stored in the cluster's metadata."""
    return hashlib.sha256(secret.encode()).hexdigest() if secret else None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: only this machine can reach the endpoint."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _read_key(environ: Mapping[str, str], variable: str, role: str) -> str | None:
    value = environ.get(variable)
    if value is None:
        return None
    if not value.strip():
        raise KeyPolicyError(f"${variable} ({role}) is set but empty: unset it or give it a key of at least "
                             f"{MIN_KEY_CHARS} characters (openssl rand -hex 32)")
    if len(value) < MIN_KEY_CHARS:
        raise KeyPolicyError(f"${variable} ({role}) has {len(value)} characters; keys need at least "
                             f"{MIN_KEY_CHARS} (openssl rand -hex 32)")
    return value


@dataclass(frozen=True)
class Keys:
    """Digests of the endpoint key and the operator key (None: not configured)."""

    api: str | None
    operator: str | None

    @classmethod
    def from_environment(cls, serve: ServeConfig, environ: Mapping[str, str] | None = None) -> Keys:
        """The keys of ``serve.api_key_env`` and ``serve.base_key_env``; :class:`KeyPolicyError` when they
        break the rules of the module docstring."""
        environ = os.environ if environ is None else environ
        api = _read_key(environ, serve.api_key_env, "endpoint key")
        operator = _read_key(environ, serve.base_key_env, "operator key")
        if api is not None and api == operator:
            raise KeyPolicyError(f"${serve.api_key_env} equals ${serve.base_key_env}: the endpoint key would "
                                 "open the operator models; give them different keys")
        if api is None and not serve.allow_anonymous and not is_loopback(serve.host):
            raise KeyPolicyError(
                f"serve.host is {serve.host}, reachable from other machines, and ${serve.api_key_env} is not "
                f"set in the environment that builds the app: refusing to serve anonymously. Set "
                f"${serve.api_key_env} (and ${serve.base_key_env} for the operator models) where `serve "
                "deploy` or the job runs (a Kubernetes secret on KubeRay), or set serve.allow_anonymous: true")
        return cls(digest(api), digest(operator))

    def opens_endpoint(self, token: str | None) -> bool:
        """Whether ``token`` may call the API at all (either key does; anyone when no endpoint key is set)."""
        return self.api is None or _matches(token, self.api) or self.is_operator(token)

    def is_operator(self, token: str | None) -> bool:
        return _matches(token, self.operator)


def _matches(token: str | None, key_digest: str | None) -> bool:
    return bool(token and key_digest) and hmac.compare_digest(digest(token), key_digest)


def public_registered_names(serve: ServeConfig, tracking: TrackingConfig) -> frozenset[str]:
    """Registered models whose versions anyone with the endpoint key may use: where the search registers its
    champion, and the registered model the deployment serves as ``merged``."""
    names = {tracking.registered_model}
    if serve.mlflow_model:
        names.add(serve.mlflow_model.replace("@", "/").partition("/")[0])
    return frozenset(names)


def needs_operator_key(model_id: str, public_registered: frozenset[str]) -> bool:
    """Whether a canonical model id is an operator model (see the module docstring)."""
    if model_id in PUBLIC_IDS:
        return False
    kind, _, rest = model_id.partition(":")
    if kind == "mlflow":
        return rest.partition("/")[0] not in public_registered
    return True
