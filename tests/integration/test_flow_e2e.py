"""The retraining flow end to end on fresh copies of the repository, tiny params, real stack.

Everything is real: the stages run through `dvc repro` in a `git init`-ed copy of the working
tree, against a temporary Prefect API (`prefect_test_harness`). The default suite runs the data
half of the pipeline (dvc.yaml cut down, as it was while the pipeline grew: the flow skips the
rest with a note) and a bad batch; the slow test runs every stage dvc.yaml defines today.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flow_support import REPO, keep_stages, tiny_repo

from flows.retrain import TABLE_OF_CONTENTS, override_params, retrain

DATA_STAGES = ("simulate", "ingest", "validate_raw", "curate", "split", "validate_curated")


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_repo(tmp_path_factory.mktemp("flow-data"))
    keep_stages(root, DATA_STAGES)
    return root


def artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        return {a.key: a for a in client.read_artifacts(artifact_filter=flt)}


def registry_versions(root: Path) -> int:
    """Model versions in the copy's MLflow registry (0 when nothing was ever registered)."""
    db = root / "mlflow.db"
    if not db.exists():
        return 0
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri=f"sqlite:///{db}").search_model_versions())


def dvc_status(root: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(done.stdout or "{}"))


def by_name(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in record["stages"] if not s["name"].startswith("dvc ")}


def check_lineage(root: Path, ran: list[str]) -> None:
    """dvc.lock records every stage the flow ran, and DVC agrees they are all up to date."""
    lock = (root / "dvc.lock").read_text()
    assert all(f"  {n}:" in lock for n in ran), lock
    status = dvc_status(root)
    assert not set(ran) & set(status), status
    assert any(p.is_file() for p in (root / ".dvc-remote").rglob("*")), "nothing pushed"


def test_main_command_runs_the_defined_stages_and_skips_the_rest(
    harness: None,
    data_repo: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from typer.testing import CliRunner

    from tracetune.cli import app

    # The README's main command, in-process: `tracetune run` drives the flow.
    result = CliRunner().invoke(app, ["run", "--params", str(data_repo / "params.yaml")])
    assert result.exit_code == 0, result.output
    record = json.loads((data_repo / "metrics/orchestration.json").read_text())
    stages = by_name(record)
    assert list(stages) == [*TABLE_OF_CONTENTS, "promote"]  # one record per line of the TOC
    ran = [n for n, s in stages.items() if s["status"] == "ran"]
    assert ran == list(DATA_STAGES)
    assert {s["status"] for n, s in stages.items() if n not in ran} == {"missing", "skipped"}
    check_lineage(data_repo, ran)
    assert [s["note"] for s in record["stages"] if s["name"] == "dvc push"] == ["ingest", ""]
    assert 0 < record["stage_s"] <= record["wall_s"]
    # The console: Prefect's log records (the flow's and the stages' captured output) and
    # whatever a process wrote straight to the terminal.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    check_console("\n".join([logged, result.output, *capfd.readouterr()]), CONSOLE_LINES_DATA_HALF)


# The main job's console, data half of the pipeline (issue 22: a walk-through's log was 825
# lines; the whole pipeline should print under ~150).
CONSOLE_LINES_DATA_HALF = 90


def check_console(printed: str, bound: int) -> None:
    """Short, rounded, no trainer dicts, no DVC hints, and the closing what-next block."""
    lines = printed.splitlines()
    print(f"console: {len(lines)} lines")
    assert 10 < len(lines) < bound, f"{len(lines)} lines:\n{printed}"
    assert not [line for line in lines if "{'loss':" in line], printed
    for hint in ("To track the changes with git", "dvc config core.autostage", "Use `dvc push`"):
        assert hint not in printed, printed
    block = printed[printed.index("What next (commands run from") :]
    for expected in ("dvc metrics show", "mlflow ui --backend-store-uri", "registry status"):
        assert expected in block, block


def test_bad_batch_fails_the_run_links_the_report_and_registers_nothing(
    harness: None, data_repo: Path
) -> None:
    versions = registry_versions(data_repo)
    registered = data_repo / "metrics/register.json"
    before = registered.read_text() if registered.exists() else None
    # The production agent goes bad: most tool calls now carry malformed JSON arguments.
    override_params(
        data_repo / "params.yaml",
        {"simulate.seed": 99, "simulate.faults.malformed_arguments": 0.7},
    )
    state = retrain(repo=str(data_repo), return_state=True)
    assert state.is_failed()
    assert "validate_raw" in str(state.result(raise_on_failure=False))

    found = artifacts(state.state_details.flow_run_id)
    link = re.fullmatch(r"\[.+\]\((file://.+)\)", str(found["validate-raw-report"].data))
    assert link and link[1].endswith("index.html"), found["validate-raw-report"].data
    assert Path(link[1].removeprefix("file://")).exists()  # the GE Data Docs page
    assert "validate_raw" in str(found["validate-raw-failure"].data)
    assert registry_versions(data_repo) == versions
    assert (registered.read_text() if registered.exists() else None) == before


# Lets a tiny model through the promotion gate and makes the approval pause short, so that
# registration and the approval flow run for real once dvc.yaml gets them that far; RLVR is
# skipped (mode never: the rule lives in the stage and has its own tests).
PASSABLE = {
    "registry.gate.min_tsr": 0.0,
    "registry.gate.max_steps_per_task": 100,
    "registry.gate.max_cost_per_task_usd": 10.0,
    "registry.gate.min_margin_vs_prompt_only": -1.0,
    "registry.gate.min_margin_vs_production": -1.0,
    "registry.gate.min_margin_vs_floor": -1.0,
    "registry.gate.use_confidence_intervals": False,
    "registry.approval_timeout_s": 3,
    "rlvr.mode": "never",
}


@pytest.mark.slow
def test_every_defined_stage_end_to_end_then_nothing_to_do(harness: None, tmp_path: Path) -> None:
    from flows.retrain import train_stage

    root = tiny_repo(tmp_path / "repo", PASSABLE)
    state = retrain(repo=str(root), approval="inline", return_state=True)
    assert state.is_completed(), state.result(raise_on_failure=False)
    record = state.result()
    stages = by_name(record)
    ran = [n for n, s in stages.items() if s["status"] == "ran"]
    print("stages exercised:", ", ".join(ran))
    print("promote:", stages["promote"])
    assert set(DATA_STAGES) | {"base_model"} <= set(ran)
    runnable = [n for n, s in stages.items() if s["status"] not in {"missing", "blocked"}]
    assert set(runnable) - {"promote"} <= set(ran)
    check_lineage(root, [n for n in ran if n != "promote"])
    evaluated = sorted(p.stem for p in (root / "metrics").glob("eval_*.json"))
    if evaluated:  # the comparison table artifact, one row per evaluated model
        table = str(artifacts(state.state_details.flow_run_id)["eval-comparison"].data)
        assert all(f"| {name.removeprefix('eval_')} |" in table for name in evaluated), table
    if "register" in ran:  # a passing challenger met the approval flow; nobody answered
        assert registry_versions(root) == 1
        assert "expire" in stages["promote"]["note"], stages["promote"]

    again = retrain(repo=str(root))  # nothing changed: DVC skips all but the forced ingest
    rerun = {n: s["status"] for n, s in by_name(again).items() if n in ran and n != "promote"}
    assert rerun.pop("ingest") == "ran"
    assert set(rerun.values()) == {"up-to-date"}, rerun
    assert by_name(again)["promote"]["status"] == "skipped"  # nothing newly registered

    one = train_stage(stage="base_model", repo=str(root))  # what the gpu-train deployment runs
    assert one["name"] == "base_model" and one["status"] == "up-to-date"

    # A plain `dvc repro` by hand after a test run wrote byte code into a stage's source
    # dependency: nothing reruns, and above all no second registry version.
    versions = registry_versions(root)
    pyc = root / "tracetune/registry/__pycache__/register.cpython-311.pyc"
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(b"written by a test run")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    by_hand = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        env=os.environ | {"PATH": path},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Running stage" not in by_hand, by_hand
    assert registry_versions(root) == versions


@pytest.mark.parametrize(
    ("registered", "mode", "status", "note"),
    [
        (
            {"version": 3, "verdict": "passed"},
            "auto",
            "skipped",
            "tracetune approve tracetune-agent 3 --by",
        ),
        ({"version": 3, "verdict": "failed"}, "inline", "skipped", "failed the promotion gate"),
        ({"version": 3, "verdict": "passed", "auto_approved": True}, "inline", "skipped", "auto"),
        (None, "deployment", "skipped", "nothing newly registered"),
    ],
)
def test_promote_offers_only_a_new_passing_challenger(
    harness: None,
    tmp_path: Path,
    registered: dict[str, Any] | None,
    mode: str,
    status: str,
    note: str,
) -> None:
    from prefect import flow

    from flows.retrain import DvcView, Pipeline
    from flows.stages import StageResult
    from tracetune.config import load_params

    params = load_params(REPO / "params.yaml")
    params = params.model_copy(
        update={"paths": params.paths.model_copy(update={"metrics": tmp_path})}
    )
    if registered is not None:
        (tmp_path / "register.json").write_text(json.dumps(registered))

    @flow
    def promote_only() -> dict[str, Any]:
        dvc = DvcView(frozenset({"register"}), None, {})
        run = Pipeline(tmp_path, params, dvc, dispatch=False, approval=mode)
        run.results.append(StageResult("register", "ran", 1.0))
        return run.promote().as_dict()

    result = promote_only()
    assert result["status"] == status and note in result["note"], result


FLAKY = """
import pathlib, sys
mark = pathlib.Path("attempts")
n = int(mark.read_text()) + 1 if mark.exists() else 1
mark.write_text(str(n))
if n == 1:
    sys.exit("botocore: Could not connect to the endpoint URL: Connection refused")
if sys.argv[1] == "broken":
    sys.exit("KeyError: 'messages'")
pathlib.Path("out.txt").write_text(sys.argv[1])
"""


def test_retries_cure_transient_failures_and_leave_real_ones_alone(
    harness: None, tmp_path: Path
) -> None:
    from prefect import flow

    from flows.stages import StageFailed, run_stage

    for name in ("flaky", "broken"):
        root = tmp_path / name
        root.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
        (root / "job.py").write_text(FLAKY)
        (root / "dvc.yaml").write_text(
            f"stages:\n  job:\n    cmd: python job.py {name}\n    outs: [out.txt]\n"
        )

    @flow
    def one_stage(root: str) -> str:
        task = run_stage.with_options(retries=3, retry_delay_seconds=0)
        return str(task("job", root, "reports").status)

    # First attempt: a connection error (retried); second: success.
    assert one_stage(str(tmp_path / "flaky")) == "ran"
    assert (tmp_path / "flaky/attempts").read_text() == "2"
    # First attempt transient, second a real bug: not retried again despite retries=3.
    with pytest.raises(StageFailed, match="KeyError"):
        one_stage(str(tmp_path / "broken"))
    assert (tmp_path / "broken/attempts").read_text() == "2"
