"""The registry handle every operation takes: a client, the model name, the lock, tag names.

Tag names live here, once: the gate writes them, approval reads them, `registry status` shows
them. All of ours start with `tracetune.` so they never collide with MLflow's own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracetune.config import TrackingParams
from tracetune.registry.history import ChampionState, load_state
from tracetune.registry.locking import registry_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

CHAMPION, CHALLENGER = "champion", "challenger"
STATE_TAG = "tracetune.champion_state"  # on the registered model (history.py)
# On each model version:
CANDIDATE_TAG = "tracetune.candidate"  # the pipeline's name for it: sft, rlvr, ...
MODEL_PATH_TAG = "tracetune.model_path"
EVAL_TAG = "tracetune.eval"  # the candidate's metrics block (JSON), for later comparisons
GATE_VERDICT = "tracetune.gate.verdict"  # passed | failed: set when the version is created
GATE_REASONS = "tracetune.gate.reasons"  # JSON list, one line per check, failures first
GATE_FAILED = "tracetune.gate.failed"  # comma-separated failed checks
GATE_CHAMPION = "tracetune.gate.champion"  # the champion it was compared with, or "none"
GATE_PARAMS = "tracetune.gate.params"  # the thresholds it was judged by (JSON)
# Hash of the model's files and its evaluation file: a rerun of `register` on the same content
# (a retry, a second `dvc repro`) finds the version it made instead of making another one.
CONTENT_TAG = "tracetune.content_key"
APPROVAL_STATUS = "tracetune.approval.status"  # approved | rejected | expired (latest)
APPROVAL_BY = "tracetune.approval.by"
APPROVAL_AT = "tracetune.approval.at"
APPROVAL_NOTE = "tracetune.approval.note"
APPROVAL_LOG = "tracetune.approval.log"  # JSON list of every decision on this version
ROLLED_BACK = "tracetune.rolled_back"  # "<time> by <name>" when rollback demoted it
READY = "READY"


class RegistryError(RuntimeError):
    """A registry operation that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Registry:
    """One registered model in one MLflow store (embedded SQLite or a server)."""

    client: MlflowClient
    name: str
    tracking_uri: str
    lock_timeout_s: float = 120.0

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise alias and history changes for this model (`locking.py`)."""
        with registry_lock(self.client, self.tracking_uri, self.name, self.lock_timeout_s):
            yield

    def model(self) -> RegisteredModel:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if str(getattr(exc, "error_code", "")) != "RESOURCE_DOES_NOT_EXIST":
                raise
            from tracetune.registry.locking import is_lock_model

            known = sorted(
                m.name for m in self.client.search_registered_models() if not is_lock_model(m.name)
            )
            raise RegistryError(
                f"no registered model {self.name!r} in {self.tracking_uri} (registered: "
                f"{', '.join(known) or 'none yet; `dvc repro register` makes one'})"
            ) from None

    def version(self, version: str | int) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} has no version {version}: {exc.message}") from None

    def aliases(self) -> dict[str, str]:
        """alias -> version (MLflow keeps each alias on at most one version)."""
        return {k: str(v) for k, v in (self.model().aliases or {}).items()}

    def alias(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def state(self) -> ChampionState:
        return load_state(self.model().tags.get(STATE_TAG))


def open_registry(
    tracking: TrackingParams, name: str | None = None, lock_timeout_s: float = 120.0
) -> Registry:
    """A registry handle on the configured store (`MLFLOW_TRACKING_URI` wins, tracking.py)."""
    from mlflow import MlflowClient

    from tracetune.tracking import set_uri_not_exported, tracking_uri

    uri = tracking_uri(tracking)
    # Not `mlflow.set_registry_uri`: it exports MLFLOW_REGISTRY_URI, which would then outrank
    # the params of every later call in this process. MLflow's default registry is the store.
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    set_uri_not_exported(uri)
    with store_init_lock(uri, lock_timeout_s):
        client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
        client.search_registered_models(max_results=1)  # opens the registry store too
    return Registry(client, name or tracking.registered_model, uri, lock_timeout_s)


@contextmanager
def store_init_lock(uri: str, timeout_s: float) -> Iterator[None]:
    """Open a local store under a file lock: MLflow creates and migrates a fresh SQLite
    database on first use, and two processes doing that at once fail ("table exists")."""
    from tracetune.registry.locking import file_lock, local_store_path, lock_dir

    store = local_store_path(uri)
    if store is None:
        yield
        return
    with file_lock(lock_dir(store) / "init.lock", timeout_s):
        yield


def ensure_registered_model(registry: Registry, description: str = "") -> None:
    """Create the registered model unless it exists (a concurrent creator is fine)."""
    from mlflow.exceptions import MlflowException

    try:
        registry.client.create_registered_model(registry.name, description=description or None)
    except MlflowException as exc:
        if str(getattr(exc, "error_code", "")) != "RESOURCE_ALREADY_EXISTS":
            raise


def wait_until_ready(registry: Registry, version: str, timeout_s: float = 300.0) -> ModelVersion:
    """Block until a version's files are in place (servers copy them asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mv = registry.version(version)
        if mv.status == READY:
            return mv
        if mv.status == "FAILED_REGISTRATION":
            raise RegistryError(
                f"{registry.name} v{version} failed to register: {mv.status_message}"
            )
        if time.monotonic() >= deadline:
            raise RegistryError(f"{registry.name} v{version} not READY after {timeout_s:.0f} s")
        time.sleep(0.5)


def json_tag(tags: dict[str, str], key: str, default: Any = None) -> Any:
    """A JSON-valued tag, or `default` when absent or unreadable."""
    try:
        return json.loads(tags[key])
    except (KeyError, TypeError, ValueError):
        return default
