"""The flow's small pure helpers: retry classification, reports, dvc.lock, tables, overrides."""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flows import retrain as retrain_module
from flows.retrain import TABLE_OF_CONTENTS, override_params, run_record
from flows.stages import (
    StageFailed,
    StageResult,
    artifact_key,
    eval_rows,
    is_transient,
    lock_entry,
    markdown_table,
    new_reports,
    retry_transient,
    snapshot_reports,
    stage_env,
)
from tracetune.config import ParamsError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text",
    [
        "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL",
        "ERROR: unexpected error - [Errno 111] Connection refused",
        "An error occurred (SlowDown) when calling the PutObject operation",
        "ReadTimeoutError: Read timed out. (read timeout=60)",
        "An error occurred (ServiceUnavailable): Service Unavailable",
        "error: the log store failed: reading s3://logs/a.jsonl at byte 3145728 of 10347360: "
        'ReadTimeoutError: Read timeout on endpoint URL: "None" (failed 5 times in a row',
        "error: the log store failed: reading s3://logs/a.jsonl at byte 0 of 9: ClientError: An "
        "error occurred (PreconditionFailed) (the object was replaced after it was listed; ...)",
    ],
)
def test_network_and_s3_throttling_errors_are_transient(text: str) -> None:
    assert is_transient(text)


@pytest.mark.parametrize(
    "text",
    [
        "GX gate 'raw' FAILED: 2 of 14 expectations (args_json: 0.41 < 0.85)",
        "torch.OutOfMemoryError: CUDA out of memory",
        "KeyError: 'messages'",
        "ERROR: failed to reproduce 'register': No such file or directory",
    ],
)
def test_gate_failures_and_bugs_are_not_transient(text: str) -> None:
    assert not is_transient(text)


class _State:
    """What Prefect hands `retry_condition_fn`: a state whose result() raises the error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> Any:
        raise self.error


def test_retry_condition_retries_only_transient_failures() -> None:
    assert retry_transient(None, None, _State(StageFailed("s3", transient=True)))
    assert retry_transient(None, None, _State(ConnectionResetError("reset")))
    assert not retry_transient(None, None, _State(StageFailed("gate", transient=False)))
    assert not retry_transient(None, None, _State(ValueError("bug")))


def test_stage_failed_survives_pickling() -> None:
    import pickle

    err = pickle.loads(
        pickle.dumps(StageFailed("x", stage="ingest", transient=True, reports=("r",)))
    )
    assert (str(err), err.stage, err.transient, err.reports) == ("x", "ingest", True, ("r",))


def test_stage_env_puts_this_interpreter_first_on_path() -> None:
    env = stage_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert stage_env(env)["PATH"] == env["PATH"]  # idempotent


def test_new_reports_prefers_the_data_docs_index(tmp_path: Path) -> None:
    old = tmp_path / "gx/raw/old.html"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    before = snapshot_reports(tmp_path)
    time.sleep(0.01)
    for rel in ("gx/raw/index.html", "gx/raw/validations/run.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("new")
    assert new_reports(before, snapshot_reports(tmp_path)) == (str(tmp_path / "gx/raw/index.html"),)
    assert new_reports(before, before) == ()
    assert snapshot_reports(tmp_path / "missing") == {}


def test_lock_entry_reads_plain_and_foreach_stages(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: a\n  evaluate@base:\n    cmd: b\n"
    )
    assert lock_entry(tmp_path, "ingest") == {"cmd": "a"}
    assert lock_entry(tmp_path, "evaluate@base") == {"cmd": "b"}
    assert lock_entry(tmp_path, "evaluate@sft") is None
    assert lock_entry(tmp_path / "nowhere", "ingest") is None


def test_eval_table_orders_candidates_and_puts_key_metrics_first(tmp_path: Path) -> None:
    for name, tsr in (("sft", 0.61), ("base", 0.12), ("rlvr", 0.7)):
        payload = {"steps_mean": 3.5, "tsr": tsr, "per_family": {"x": 1}, "model": f"m-{name}"}
        (tmp_path / f"eval_{name}.json").write_text(json.dumps(payload))
    (tmp_path / "eval_broken.json").write_text("{not json")
    rows = eval_rows(tmp_path)
    assert [r["candidate"] for r in rows] == ["base", "sft", "rlvr"]
    table = markdown_table(rows)
    header = table.splitlines()[0]
    assert header.startswith("| candidate | model | tsr |") and "per_family" not in header
    assert "| sft | m-sft | 0.61 |" in table
    assert markdown_table([]) == ""


def test_eval_table_reads_the_evaluate_stage_shape_and_adds_the_baselines(
    tmp_path: Path,
) -> None:
    def arm(tsr: float) -> dict[str, Any]:
        ci = {"tsr_ci_low": tsr - 0.05, "tsr_ci_high": tsr + 0.05}
        return {"tsr": tsr, **ci, "steps_mean": 2.5, "cost_per_task_usd": 0.0002, "n": 200,
                "per_family": {"x": {"tsr": 1.0}}}  # fmt: skip

    for name, tsr in (("sft", 0.44), ("rlvr", 0.45)):
        payload = {
            "model": name,
            "candidate": arm(tsr),
            "baseline_prompt_only": arm(0.0),
            "baseline_production": arm(0.71),
            "delta": {"tsr_vs_production": round(tsr - 0.71, 3)},
        }
        (tmp_path / f"eval_{name}.json").write_text(json.dumps(payload))
    rows = eval_rows(tmp_path)
    names = [r["candidate"] for r in rows]
    assert names == ["sft", "rlvr", "baseline_prompt_only", "baseline_production"]
    assert rows[0]["tsr"] == 0.44 and rows[0]["tsr_95ci"] == "[0.390, 0.490]"
    assert rows[1]["tsr_vs_production"] == -0.26
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| candidate | tsr | tsr_95ci | steps_mean |")
    assert "per_family" not in table


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("validate_raw", "report", "") == "validate-raw-report"
    assert artifact_key("evaluate@sft", "failure") == "evaluate-sft-failure"


def test_override_params_keeps_comments_and_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    override_params(path, {"ingest.source": "s3://logs/agent/", "simulate.n_trajectories": 5})
    text = path.read_text()
    assert "source: s3://logs/agent/" in text and "n_trajectories: 5" in text
    assert "# A local folder/file, or s3://bucket/prefix" in text  # comments survive
    with pytest.raises(ParamsError, match=r"simulate\.n_trajectoris: unknown key"):
        override_params(path, {"simulate.n_trajectoris": 5})
    assert path.read_text() == text  # a bad override leaves the file as it was


def test_run_record_splits_flow_time_into_stages_and_orchestration() -> None:
    results = [
        StageResult("a", "ran", 6.0),
        StageResult("b", "missing"),
        StageResult("c", "ran", 3.0),
    ]
    record = run_record(results, wall_s=10.0)
    assert (record["stage_s"], record["overhead_s"], record["overhead_share"]) == (9.0, 1.0, 0.1)
    assert [s["name"] for s in record["stages"]] == ["a", "b", "c"]


def test_the_flow_body_is_the_table_of_contents() -> None:
    """`retrain` calls run.stage/run.train once per name of TABLE_OF_CONTENTS, in order."""
    tree = ast.parse(inspect.getsource(retrain_module.retrain.fn))
    calls = sorted(
        (node.lineno, node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"stage", "train"}
        and node.args
        and isinstance(node.args[0], ast.Constant)
    )
    assert [name for _, name in calls] == list(TABLE_OF_CONTENTS)
