"""The registry against a real MLflow SQLite store: register, gate, approve, reject, rollback,
predict, and concurrent promoters in separate processes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_support import (
    PNG_1X1,
    add_bare_version,
    approve_worker,
    build_tiny_model,
    eval_metrics,
    make_params,
    params_dict,
    register_worker,
    run_concurrently,
    write_dvc_lock,
    write_eval,
    write_params,
)
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.config import Params
from tracetune.registry.approval import NotPromotableError, approve, registry_status
from tracetune.registry.client import Registry, open_registry

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test talks to the store its params name (see `fresh_mlflow_env`)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite store for the module (creating one costs seconds); tests use own models."""
    root = tmp_path_factory.mktemp("store")
    yield f"sqlite:///{root / 'mlflow.db'}"


def _candidate(root: Path, model: Path, name: str = "sft", **metrics: Any) -> Path:
    """Eval file + report + dvc.lock for a candidate: `model` copied to `models/<name>`."""
    target = root / "models" / name
    if not target.exists():
        shutil.copytree(model, target)
    write_dvc_lock(root, f"models/{name}")
    path = write_eval(root, name, eval_metrics(candidate=name, model_path=str(target), **metrics))
    # the evaluate stage's layout: plots in reports/eval_plots/<name>, linked from the report
    plots = root / "reports" / "eval_plots" / name
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "tsr.png").write_bytes(PNG_1X1)
    report = root / "reports" / "eval" / name / "report.md"
    report.write_text(report.read_text() + f"\n![tsr](../../eval_plots/{name}/tsr.png)\n")
    return path


def _register(params: Params, root: Path, **metrics: Any) -> dict[str, Any]:
    from tasks import register as stage

    return stage.run(params, "sft", dvc_lock=root / "dvc.lock", params_file=None)


def test_register_stage_records_metrics_lineage_verdict_and_loads_back(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    import mlflow

    params = make_params(tmp_path, store, "agent-lineage")
    _candidate(tmp_path, tiny_model)
    summary = _register(params, tmp_path)

    assert summary["verdict"] == "passed" and summary["challenger"] is True
    assert summary == json.loads((tmp_path / "metrics" / "register.json").read_text())
    # each check with its value and bound, for the flow's gate-verdict artifact
    checks = {c["name"]: c for c in summary["checks"]}
    assert len(checks) == 7 and checks["min_tsr"]["threshold"] == params.registry.gate.min_tsr
    assert checks["min_tsr"]["passed"] and 0 < checks["min_tsr"]["observed"] < 0.85
    registry = open_registry(params.tracking)
    version = summary["version"]
    assert registry.aliases() == {"challenger": version}  # the champion waits for approval
    tags = registry.version(version).tags
    assert tags["tracetune.gate.verdict"] == "passed"
    reasons = json.loads(tags["tracetune.gate.reasons"])
    assert len(reasons) == 7 and any("TSR gain vs doing nothing" in r for r in reasons)
    assert tags["tracetune.dvc.data/curated/train.jsonl"] == "a" * 32
    assert tags["tracetune.dvc.models/sft"].endswith(".dir")
    assert "tracetune.git_commit" in tags
    assert json.loads(tags["tracetune.eval"])["tsr_ci_low"] < 0.85

    client = registry.client
    run = client.get_run(summary["run_id"])
    metrics = run.data.metrics
    assert metrics["tsr"] == 0.85 and metrics["tsr_vs_production"] == pytest.approx(0.12)
    assert metrics["steps_per_task"] == 3.0 and metrics["gate.passed"] == 1.0
    assert len(metrics) < 15  # no per-family or per-baseline keys: those are in the artifacts
    assert run.data.params["sft.learning_rate"] and run.data.params["candidate"] == "sft"
    assert run.data.tags["tracetune.model_version"] == version
    folders = ("eval", "eval/report", "lineage", "gate")
    artifacts = {a.path for d in folders for a in client.list_artifacts(run.info.run_id, d)}
    expected = {"eval/eval_sft.json", "eval/report/report.md", "eval/report/tsr_by_family.png"}
    expected |= {"eval/report/tsr.png", "eval/report/report.html", "eval/comparison.md"}
    expected |= {"lineage/dvc.lock", "lineage/lineage.json", "gate/verdict.json"}
    assert expected <= artifacts
    # the report links the plots the evaluate stage wrote, logged beside it
    report = Path(client.download_artifacts(run.info.run_id, "eval/report/report.md")).read_text()
    assert "![tsr](tsr.png)" in report and "eval_plots" not in report
    comparison = Path(client.download_artifacts(run.info.run_id, "eval/comparison.md")).read_text()
    assert "production logs" in comparison and "do-nothing floor" in comparison
    # the logged model carries the registered model's name, not `model`
    logged = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert [m.name for m in logged] == ["agent-lineage"]
    # the gate's reasons: one markdown list item each, blank lines between them
    description = registry.version(version).description or ""
    assert all(f"\n\n- {reason}\n" in description for reason in reasons)

    components = mlflow.transformers.load_model(
        f"models:/{registry.name}/{version}", return_type="components"
    )
    assert components["model"].config.num_hidden_layers == 2
    assert "{% generation %}" in components["tokenizer"].chat_template

    # the registry round trip changes nothing the agent depends on
    import torch

    from tracetune.agent.model import load_model
    from tracetune.registry.serving import load_registered_agent

    disk_model, disk_tok = load_model(tmp_path / "models" / "sft", device="cpu")
    reg_model, reg_tok = load_registered_agent(f"models:/{registry.name}/{version}", "cpu")
    call = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "O-1"}}\n</tool_call>'
    assert disk_tok(call)["input_ids"] == reg_tok(call)["input_ids"]
    assert disk_tok.chat_template == reg_tok.chat_template
    assert disk_model.generation_config.eos_token_id == reg_model.generation_config.eos_token_id
    disk_state, reg_state = disk_model.state_dict(), reg_model.state_dict()
    assert all(torch.equal(disk_state[k], reg_state[k]) for k in disk_state)


def test_lifecycle_gate_approve_reject_rollback_predict_from_the_cli(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    """v1 passes and is approved; v2 fails the gate (aliases untouched, approval refused);
    v3 passes, is rejected, then approved; rollback returns to v1; the champion acts."""
    name = "agent-life"
    params = make_params(tmp_path, store, name)
    params_file = str(write_params(tmp_path, store, name))
    cli = ["--params", params_file]

    _candidate(tmp_path, tiny_model)
    assert _register(params, tmp_path)["version"] == "1"
    ok = runner.invoke(app, ["approve", name, "1", "--by", "ana", "--note", "first", *cli])
    assert ok.exit_code == 0, ok.output
    assert "champion v1 (was none), approved by ana" in ok.output

    _candidate(tmp_path, tiny_model, tsr=0.3)
    failed = _register(params, tmp_path)
    assert failed["verdict"] == "failed" and failed["challenger"] is False
    assert "min_tsr" in failed["failed"] and "champion_non_inferiority" in failed["failed"]
    registry = open_registry(params.tracking)
    assert registry.aliases() == {"champion": "1"}  # failing leaves aliases untouched
    refused = runner.invoke(app, ["approve", name, "2", "--by", "ana", *cli])
    assert refused.exit_code == 1
    assert "did not pass the promotion gate" in refused.output and "TSR" in refused.output
    assert registry.aliases() == {"champion": "1"}

    _candidate(tmp_path, tiny_model, tsr=0.9)
    assert _register(params, tmp_path)["version"] == "3"
    assert registry.aliases() == {"champion": "1", "challenger": "3"}
    rejected = runner.invoke(app, ["reject", name, "3", "--by", "bo", "--note", "too slow", *cli])
    assert rejected.exit_code == 0 and "v3 rejected by bo" in rejected.output
    assert registry.aliases() == {"champion": "1"}
    approved = runner.invoke(app, ["approve", name, "3", "--by", "cy", "--note", "fine", *cli])
    assert approved.exit_code == 0 and "champion v3 (was v1)" in approved.output
    tags = registry.version("3").tags
    assert (tags["tracetune.approval.status"], tags["tracetune.approval.by"]) == ("approved", "cy")
    assert tags["tracetune.approval.note"] == "fine" and tags["tracetune.approval.at"]
    log = json.loads(tags["tracetune.approval.log"])
    assert [e["status"] for e in log] == ["rejected", "approved"]

    back = runner.invoke(app, ["rollback", name, "--by", "dee", "--note", "regression", *cli])
    assert back.exit_code == 0 and "champion v1 (rolled back from v3)" in back.output
    assert registry.alias("champion") == "1"
    assert "tracetune.rolled_back" in registry.version("3").tags
    again = runner.invoke(app, ["rollback", name, "--by", "dee", *cli])
    assert again.exit_code == 1 and "only approved champion" in again.output

    status = runner.invoke(app, ["registry", "status", name, "--json", *cli])
    assert status.exit_code == 0, status.output
    payload = json.loads(status.stdout)
    assert [e["action"] for e in payload["history"]] == ["approve", "reject", "approve", "rollback"]
    assert payload["champion_stack"] == ["1"] and payload["problems"] == []
    assert [v["gate"] for v in payload["versions"]] == ["passed", "failed", "passed"]
    table = runner.invoke(app, ["registry", "status", name, *cli])
    assert table.exit_code == 0 and "champion history" in table.output

    predicted = runner.invoke(app, ["predict", "--max-new-tokens", "8", "--json", *cli])
    assert predicted.exit_code == 0, predicted.output
    episode = json.loads(predicted.stdout)
    assert episode["model_uri"] == f"models:/{name}@champion" and episode["version"] == "1"
    assert episode["steps"] >= 1 and episode["messages"][0]["role"] == "system"


def test_auto_approve_promotes_without_a_human(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    params = make_params(tmp_path, store, "agent-auto", auto_approve=True)
    _candidate(tmp_path, tiny_model)
    summary = _register(params, tmp_path)
    assert summary["auto_approved"] is True
    registry = open_registry(params.tracking)
    assert registry.aliases() == {"champion": summary["version"]}
    assert registry.version(summary["version"]).tags["tracetune.approval.by"] == "auto-approve"


def _bare_registry(store: str, name: str, tmp_path: Path, **registry: Any) -> Registry:
    return open_registry(make_params(tmp_path, store, name, **registry).tracking)


def test_approving_an_unknown_version_is_a_clear_error(tmp_path: Path, store: str) -> None:
    registry = _bare_registry(store, "agent-unknown", tmp_path)
    add_bare_version(registry.client, registry.name)
    with pytest.raises(Exception, match="has no version 9"):
        approve(registry, "9", "ana")
    failed = add_bare_version(registry.client, registry.name, passed=False)
    with pytest.raises(NotPromotableError, match="did not pass the promotion gate"):
        approve(registry, failed, "ana")


def _assert_serialised(registry: Registry, versions: list[str]) -> None:
    """One champion, and a history in which every approval saw its predecessor's result."""
    status = registry_status(registry)
    approvals = [e for e in status["history"] if e["action"] == "approve"]
    assert sorted(e["version"] for e in approvals) == sorted(versions)  # no lost update
    previous = None
    for event in approvals:
        assert event["previous"] == previous  # each read the champion the last one wrote
        previous = event["version"]
    assert status["aliases"]["champion"] == previous == status["champion_stack"][-1]
    assert status["champion_stack"] == [e["version"] for e in approvals]


def test_concurrent_approvals_in_processes_keep_one_champion_and_all_history(
    tmp_path: Path, store: str
) -> None:
    name = "agent-race"
    registry = _bare_registry(store, name, tmp_path)
    versions = [add_bare_version(registry.client, name) for _ in range(3)]
    params = params_dict(tmp_path, store, name)
    results = run_concurrently(approve_worker, [(params, v) for v in versions], tmp_path)
    assert all(r["ok"] for r in results), results
    _assert_serialised(registry, versions)
    stack = registry_status(registry)["champion_stack"]
    # concurrent rollbacks: each pops one champion, none is lost or applied twice
    results = run_concurrently(approve_worker, [(params, "-", "rollback")] * 2, tmp_path)
    assert all(r["ok"] for r in results), results
    status = registry_status(registry)
    assert status["champion_stack"] == stack[:1] and status["aliases"]["champion"] == stack[0]
    assert [e["action"] for e in status["history"]][-2:] == ["rollback", "rollback"]


@pytest.mark.slow
def test_concurrent_registrations_never_alias_an_unfinished_version(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    """Two `register` stages at once on different evaluations (auto-approve on): both versions
    complete, each alias points at a READY, gate-passed version, and the champion history has
    both approvals. Two at once on the same content make one version between them."""
    name = "agent-register-race"
    jobs = []
    for i, tsr in enumerate((0.85, 0.86)):
        root = tmp_path / f"ws{i}"
        _candidate(root, tiny_model, tsr=tsr)
        jobs.append((params_dict(root, store, name, auto_approve=True), str(root)))
    results = run_concurrently(register_worker, jobs, tmp_path)
    assert all(r["ok"] for r in results), results
    registry = _bare_registry(store, name, tmp_path)
    aliases = registry.aliases()
    for version in aliases.values():
        mv = registry.version(version)
        assert mv.status == "READY" and mv.tags["tracetune.gate.verdict"] == "passed"
    _assert_serialised(registry, sorted(r["version"] for r in results))

    same = run_concurrently(register_worker, [jobs[0]] * 2, tmp_path)
    assert all(r["ok"] for r in same), same
    assert {r["version"] for r in same} == {results[0]["version"]}  # both found the earlier one
    assert len(registry.client.search_model_versions(f"name = '{name}'")) == 2


def test_registering_the_same_model_and_evaluation_again_makes_no_new_version(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    """A retried stage or a second `dvc repro` must not duplicate registry versions; a new
    evaluation of the same model is new content and gets its own version."""
    name = "agent-idempotent"
    params = make_params(tmp_path, store, name)
    _candidate(tmp_path, tiny_model)
    first = _register(params, tmp_path)
    again = _register(params, tmp_path)
    assert (first["version"], first["reused"]) == ("1", False)
    assert (again["version"], again["reused"], again["verdict"]) == ("1", True, "passed")
    assert again["challenger"] is True and again["reasons"] == first["reasons"]
    registry = open_registry(params.tracking)
    assert [
        str(mv.version) for mv in registry.client.search_model_versions(f"name = '{name}'")
    ] == ["1"]
    _candidate(tmp_path, tiny_model, tsr=0.9)  # re-evaluated: a different evaluation file
    assert _register(params, tmp_path)["version"] == "2"
    description = registry.version("2").description
    assert "\n- PASS" in description or "\n- FAIL" in description  # one markdown item per check


def test_registry_commands_leave_no_lock_files_beside_the_store(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Locks live in the temporary folder: the workspace keeps only the store itself, even
    after a command naming a model that does not exist."""
    store_dir = tmp_path / "ws"
    store_dir.mkdir()
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    params = make_params(tmp_path, uri, "agent-nolocks")
    _candidate(tmp_path, tiny_model)
    _register(params, tmp_path)
    params_file = str(write_params(tmp_path, uri, "agent-nolocks"))
    runner.invoke(app, ["approve", "agent-nolocks", "1", "--by", "ana", "--params", params_file])
    runner.invoke(app, ["approve", "no-such-model", "1", "--by", "ana", "--params", params_file])
    assert sorted(p.name for p in store_dir.iterdir()) == ["mlflow.db"]


def test_predict_and_registry_errors_are_one_line_with_the_right_hint(
    tmp_path: Path, store: str, tiny_model: Path
) -> None:
    """A typo'd task id, an unset alias or an unknown model: one error line that says what to
    do next (no traceback), exit code 1."""
    name = "agent-errors"
    params_file = str(write_params(tmp_path, store, name))
    cli = ["--params", params_file]
    _candidate(tmp_path, tiny_model)
    _register(make_params(tmp_path, store, name), tmp_path)
    assert runner.invoke(app, ["approve", name, "1", "--by", "ana", *cli]).exit_code == 0

    cases = {
        ("--task-id", "nosuch:task"): "no task 'nosuch:task' in environment support_desk",
        ("--alias", "challenger"): "passes the promotion gate at registration",
        ("--model", "no-such-model"): "no registered model 'no-such-model'",
    }
    for args, expected in cases.items():
        result = runner.invoke(app, ["predict", *args, *cli])
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) <= 3, result.output
    status = runner.invoke(app, ["registry", "status", "no-such-model", *cli])
    assert status.exit_code == 1 and "no registered model" in status.output, status.output
