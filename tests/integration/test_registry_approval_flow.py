"""The Prefect approval flow on a real (temporary) Prefect API and a real MLflow store: it
pauses for a `RunInput`, is resumed with a decision, or times out and records that."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_support import add_bare_version, write_params

from tracetune.registry.client import open_registry

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test talks to the store its params name (see `fresh_mlflow_env`)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # loaded 2 cores: > 90 s seen
        yield


def _setup(tmp_path: Path, name: str, **registry: Any) -> tuple[str, Any]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file = write_params(tmp_path, uri, name, **registry)
    from tracetune.config import load_params

    reg = open_registry(load_params(params_file).tracking)
    return str(params_file), reg


def _paused_run_id(flow_name: str, timeout_s: float = 60) -> Any:
    """The id of the paused run of `flow_name` (polls the Prefect API)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout_s
    by_name = FlowFilter(name=FlowFilterName(any_=[flow_name]))
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_filter=by_name)
            paused = [r for r in runs if r.state is not None and r.state.is_paused()]
            if paused:
                return paused[0].id
            time.sleep(0.3)
    raise TimeoutError("the approval flow never paused")


def _artifact(key: str) -> str:
    """The latest markdown of a keyed Prefect artifact."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts()
    found = [a for a in latest if a.key == key]
    assert found, [a.key for a in latest]
    return str(found[0].data)


def test_flow_pauses_for_input_and_a_reviewer_approves(prefect_api: None, tmp_path: Path) -> None:
    from prefect.flow_runs import resume_flow_run

    from flows.approval import approval

    params_file, registry = _setup(tmp_path, "flow-agent")
    version = add_bare_version(registry.client, registry.name)
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(approval(version, None, params_file, timeout_s=120, poll_interval_s=1))

    thread = threading.Thread(target=run)
    thread.start()
    run_id = _paused_run_id("approval")
    assert registry.alias("champion") is None  # nothing moves while paused
    # The form as first shown (nothing chosen, no name): refused, the flow keeps waiting.
    with pytest.raises(RuntimeError, match="'decision' is a required property"):
        resume_flow_run(run_id, run_input={"note": ""})
    assert _paused_run_id("approval", timeout_s=5) == run_id
    # Passes the schema but blank: the flow logs it and pauses again; the request is not lost.
    resume_flow_run(run_id, run_input={"decision": "reject", "by": "  ", "note": " "})
    time.sleep(2)
    assert _paused_run_id("approval", timeout_s=30) == run_id and thread.is_alive()
    assert "tracetune.approval.status" not in registry.version(version).tags
    resume_flow_run(run_id, run_input={"decision": "approve", "by": "ana", "note": "looks good"})
    thread.join(120)
    assert result["action"] == "approve" and result["champion"] == version
    tags = registry.version(version).tags
    assert (tags["tracetune.approval.by"], tags["tracetune.approval.note"]) == ("ana", "looks good")
    request = _artifact("approval-request")
    assert f"v{version}: approve by ana" in request and "looks good" in request


def test_flow_timeout_records_expiry_and_leaves_the_champion(
    prefect_api: None, tmp_path: Path
) -> None:
    from flows.approval import approval

    params_file, registry = _setup(tmp_path, "flow-timeout")
    version = add_bare_version(registry.client, registry.name)
    result = approval(version, None, params_file, timeout_s=2, poll_interval_s=1)
    assert result["action"] == "expire" and result["champion"] is None
    assert registry.version(version).tags["tracetune.approval.status"] == "expired"
    assert registry.alias("champion") is None


@pytest.mark.slow  # the same approve/refusal code is covered in test_registry.py
def test_flow_refuses_a_failed_version_and_auto_approves_when_allowed(
    prefect_api: None, tmp_path: Path
) -> None:
    from flows.approval import approval

    params_file, registry = _setup(tmp_path, "flow-auto", auto_approve=True)
    failed = add_bare_version(registry.client, registry.name, passed=False)
    refused = approval(failed, None, params_file)
    assert refused["action"] == "refused" and "did not pass" in refused["message"]
    passed = add_bare_version(registry.client, registry.name)
    auto = approval(passed, None, params_file)
    assert auto["action"] == "approve" and auto["by"] == "auto-approve"
    assert registry.alias("champion") == passed
