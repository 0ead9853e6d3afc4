"""The registry against a real `mlflow server` on loopback: registration, concurrent promoters
in separate processes (the registered-model lock), stale and held locks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_support import (
    add_bare_version,
    approve_worker,
    build_tiny_model,
    eval_metrics,
    make_params,
    mlflow_server,
    params_dict,
    run_concurrently,
    write_dvc_lock,
    write_eval,
)

from tracetune.registry.approval import approve, registry_status, rollback
from tracetune.registry.client import Registry, open_registry
from tracetune.registry.locking import EXPIRES_TAG, OWNER_TAG, RegistryLockTimeout

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test talks to the store its params name (see `fresh_mlflow_env`)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def _registry(tmp_path: Path, uri: str, name: str, lock_timeout_s: float = 60) -> Registry:
    params = make_params(tmp_path, uri, name, lock_timeout_s=lock_timeout_s)
    return open_registry(params.tracking, lock_timeout_s=params.registry.lock_timeout_s)


def test_register_through_the_server_and_load_back(tmp_path: Path, server: str) -> None:
    import mlflow

    from tasks import register as stage

    model = build_tiny_model(tmp_path / "models" / "sft")
    write_dvc_lock(tmp_path)
    write_eval(tmp_path, "sft", eval_metrics(model_path=str(model)))
    params = make_params(tmp_path, server, "srv-agent")
    summary = stage.run(params, "sft", dvc_lock=tmp_path / "dvc.lock", params_file=None)
    assert summary["verdict"] == "passed" and summary["challenger"]
    registry = open_registry(params.tracking)
    assert registry.tracking_uri == server
    mv = registry.version(summary["version"])
    assert mv.status == "READY" and mv.tags["tracetune.dvc.models/sft"].endswith(".dir")
    approve(registry, summary["version"], "ana", "via server")
    components = mlflow.transformers.load_model(
        "models:/srv-agent@champion", return_type="components"
    )
    assert components["model"].config.hidden_size == 32
    assert not [m for m in registry.client.search_registered_models() if m.name.endswith(".lock")]


def test_concurrent_approvals_through_the_server_are_serialised(
    tmp_path: Path, server: str
) -> None:
    name = "srv-race"
    registry = _registry(tmp_path, server, name)
    versions = [add_bare_version(registry.client, name) for _ in range(3)]
    params = params_dict(tmp_path, server, name)
    results = run_concurrently(approve_worker, [(params, v) for v in versions], tmp_path)
    assert all(r["ok"] for r in results), results
    status = registry_status(registry)
    approvals = [e for e in status["history"] if e["action"] == "approve"]
    assert sorted(e["version"] for e in approvals) == sorted(versions)  # no lost update
    assert [e["previous"] for e in approvals] == [None, *[e["version"] for e in approvals[:-1]]]
    assert status["aliases"]["champion"] == approvals[-1]["version"] == status["champion_stack"][-1]
    assert not registry.client.search_registered_models(f"name = '{name}.lock'")


def _plant_lock(registry: Registry, owner: str, expires_in_s: float) -> None:
    registry.client.create_registered_model(
        f"{registry.name}.lock",
        tags={OWNER_TAG: owner, EXPIRES_TAG: f"{time.time() + expires_in_s:.3f}"},
    )


def test_a_held_lock_times_out_and_a_dead_holders_lock_is_broken(
    tmp_path: Path, server: str
) -> None:
    registry = _registry(tmp_path, server, "srv-locks", lock_timeout_s=1.0)
    version = add_bare_version(registry.client, registry.name)
    _plant_lock(registry, "someone-else", expires_in_s=600)
    started = time.monotonic()
    with pytest.raises(RegistryLockTimeout, match="someone-else"):
        approve(registry, version, "ana")
    assert 0.9 < time.monotonic() - started < 10
    assert registry.alias("champion") is None  # nothing happened without the lock
    registry.client.delete_registered_model(f"{registry.name}.lock")

    _plant_lock(registry, "dead-process", expires_in_s=-1)  # expired: its holder died
    decision = approve(registry, version, "ana")
    assert decision.champion == version
    assert not registry.client.search_registered_models(f"name = '{registry.name}.lock'")


def test_rollback_through_the_server_refuses_without_history(tmp_path: Path, server: str) -> None:
    registry = _registry(tmp_path, server, "srv-rollback")
    first = add_bare_version(registry.client, registry.name)
    approve(registry, first, "ana")
    with pytest.raises(Exception, match="only approved champion"):
        rollback(registry, "bo")
    state = json.loads(registry.model().tags["tracetune.champion_state"])
    assert state["stack"] == [first]


def test_a_lock_released_while_our_create_fails_is_a_retry_not_an_error(tmp_path: Path) -> None:
    """The race CI hit once: our create collides with the holder's entry, the holder deletes it,
    then MLflow's SQL store reads the entry back to word its "already exists" error and finds
    nothing (RESOURCE_DOES_NOT_EXIST). The window is forced here in a real SQLite store: the
    read-back is preceded by the holder's delete. The attempt must report "not acquired"."""
    from mlflow import MlflowClient

    from tracetune.registry.locking import _try_create

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/race.db")
    client.create_registered_model("race.lock")  # the holder's entry
    store = client._get_registry_client().store
    read_back = store.get_registered_model

    def holder_released_first(name: str) -> object:
        store.delete_registered_model(name)
        return read_back(name)

    store.get_registered_model = holder_released_first  # type: ignore[method-assign]
    assert _try_create(client, "race.lock", "me", ttl_s=60) is False
    store.get_registered_model = read_back  # type: ignore[method-assign]
    assert _try_create(client, "race.lock", "me", ttl_s=60) is True  # the retry takes it
