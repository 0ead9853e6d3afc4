"""GX gates on real batches: a normal simulated batch passes, corrupted ones fail with a report."""

from __future__ import annotations

import copy
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from params_support import paths_under, tracking_under

from tracetune.config import (
    CuratedGateParams,
    CurateParams,
    IngestParams,
    RawGateParams,
    SplitParams,
)
from tracetune.data import features as f
from tracetune.data.gates import curated_checks, raw_checks, run_gate
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.curation import curate, exact_key
from tracetune.trajectories.ingest import IngestPaths, ingest
from tracetune.trajectories.io import iter_lines
from tracetune.trajectories.pii import pii_in
from tracetune.trajectories.split import split_curated

KNOWN = frozenset(SupportDesk().tool_names())
NOW = datetime(2026, 11, 22, tzinfo=UTC)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, sim_lines: list[str]) -> list[dict[str, Any]]:
    """A normal ingested batch of simulated production logs (faults and all)."""
    root = tmp_path_factory.mktemp("batch")
    (root / "logs").mkdir()
    (root / "logs/a.jsonl").write_text("\n".join(sim_lines) + "\n")
    paths = IngestPaths(root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "r")
    ingest(IngestParams(source=str(root / "logs")), paths)
    return [orjson.loads(x) for x in iter_lines(paths.batches)]


def raw_gate(records: list[dict[str, Any]], docs: Path):  # type: ignore[no-untyped-def]
    rows = (f.raw_row(r, KNOWN, n) for n, r in enumerate(records, 1))
    return run_gate("raw", raw_checks(RawGateParams(), KNOWN, NOW), f.RAW_COLUMNS, rows, docs)


# --- derived columns: pure functions ---------------------------------------------------------
def test_derived_columns_on_hand_made_trajectories() -> None:
    call = {"id": "c1", "function": {"name": "get_order", "arguments": '{"order_id": "O-1"}'}}
    ok: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "{}"},
        {"role": "assistant", "content": "a"},
    ]
    assert f.roles_ok(ok) and f.unanswered_calls(ok) == 0 and f.orphan_tool_messages(ok) == 0
    # what real conversations do is fine: end on a tool result or the user's goodbye, carry a
    # system note mid-way, open with the assistant's greeting
    bye = {"role": "user", "content": "thanks, bye"}
    for real in (ok[:4], [*ok, bye], [ok[1], ok[0], ok[4]], [ok[4], *ok[1:]]):
        assert f.roles_ok(real)
    assert f.unanswered_calls(ok[:4]) == 0 and f.orphan_tool_messages(ok[:4]) == 0
    # what never holds: no assistant turn, an unknown role, an unanswered call, an orphan
    assert not f.roles_ok(ok[:2]) and not f.roles_ok([*ok, {"role": "bot", "content": "x"}])
    assert f.unanswered_calls(ok[:3]) == 1  # ends on a tool call nobody answered
    assert f.orphan_tool_messages([ok[0], ok[3], ok[1], ok[4]]) == 1  # tool before any call
    assert f.unanswered_calls(ok[:3] + ok[4:]) == 1
    assert f.orphan_tool_messages([ok[1], {"role": "tool", "tool_call_id": "zz"}]) == 1
    bad_call = {"id": "c2", "function": {"name": "lookup_record", "arguments": '{"order_id": '}}
    calls = f.tool_calls([{"role": "assistant", "tool_calls": [call, bad_call]}])
    assert f.bad_arguments(calls) == 1 and f.unknown_tools(calls, KNOWN) == 1
    assert f.empty_assistant_turns([{"role": "assistant", "content": " "}]) == 1
    assert f.epoch_seconds("2026-11-01T00:00:00Z") == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert f.epoch_seconds("2026-11-01T00:00:00") is None


# --- the raw-batch gate --------------------------------------------------------------------
def test_raw_gate_passes_a_normal_batch(batch: list[dict[str, Any]], tmp_path: Path) -> None:
    rows = [f.raw_row(r, KNOWN) for r in batch]
    assert any(r["bad_arguments"] for r in rows) and any(r["unknown_tools"] for r in rows)
    result = raw_gate(batch, tmp_path / "docs")
    assert result.success, result.summary()
    assert result.rows == len(batch) and result.docs is None
    metrics = result.metrics()
    assert metrics["success"] and metrics["failed"] == 0 and metrics["evaluated"] >= 15


def corrupt(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logger faults: tool answers lost, roles shuffled, clocks in the future, absurd costs."""
    bad = copy.deepcopy(batch)
    future = (NOW + timedelta(days=30)).isoformat()
    for i, record in enumerate(bad):
        if i % 3 == 0:
            record["messages"] = [m for m in record["messages"] if m["role"] != "tool"]
        elif i % 3 == 1:
            record["messages"] = record["messages"][::-1]
        elif i % 6 == 2:  # the assistant's turns lost
            record["messages"] = [m for m in record["messages"] if m["role"] != "assistant"]
        if i % 10 == 0:
            record["timestamp"] = future
        if i % 10 == 1:
            record["cost_usd"] = 12_345.0
    return bad


def test_raw_gate_fails_a_corrupted_batch(batch: list[dict[str, Any]], tmp_path: Path) -> None:
    result = raw_gate(corrupt(batch), tmp_path / "docs")
    assert not result.success
    failed = {r.check.column for r in result.failed}
    assert {"roles_ok", "unanswered_calls", "timestamp", "cost_usd"} <= failed
    assert result.docs is not None and result.docs.exists()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))
    summary = result.summary()
    assert "FAILED" in summary and "every tool call is answered" in summary
    assert "trajectory_id=" in summary and len(summary.splitlines()) < 60


# --- the curated-set gate ------------------------------------------------------------------
def curated_set(batch: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    out = io.StringIO()
    curate((json.dumps(r) for r in batch), CurateParams(), out)
    split_curated(
        iter(out.getvalue().splitlines()), root, SplitParams(heldout_fraction=0.25, seed=0)
    )
    rows = []
    heldout = frozenset(orjson.loads(x)["task_id"] for x in iter_lines(root / "heldout.jsonl"))
    for split in ("heldout", "train"):
        for n, line in enumerate(iter_lines(root / f"{split}.jsonl"), 1):
            rec = orjson.loads(line)
            rows.append(f.curated_row(rec, split, exact_key(rec), heldout, len(pii_in(rec)), n))
    return rows


def curated_gate(rows: list[dict[str, Any]], docs: Path):  # type: ignore[no-untyped-def]
    checks = curated_checks(CuratedGateParams(min_rows=50), SupportDesk().families())
    return run_gate(
        "curated", checks, f.CURATED_COLUMNS, iter(rows), docs, ("trajectory_id", "split")
    )


def test_curated_gate_passes_then_catches_leaks_duplicates_and_pii(
    batch: list[dict[str, Any]], tmp_path: Path
) -> None:
    rows = curated_set(batch, tmp_path / "curated")
    result = curated_gate(rows, tmp_path / "docs")
    assert result.success, result.summary()

    heldout_task = next(r["task_id"] for r in rows if r["split"] == "heldout")
    bad = [dict(r) for r in rows]
    bad[-1] |= {"task_id": heldout_task, "leaks_heldout_task": 1}  # a held-out task in train
    bad += [dict(r) for r in rows[:10]]  # duplicates
    bad[0] |= {"empty_assistant_turns": 1, "pii_found": 2}
    result = curated_gate(bad, tmp_path / "docs2")
    assert not result.success
    assert {r.check.column for r in result.failed} == {
        "leaks_heldout_task",
        "content_hash",
        "empty_assistant_turns",
        "pii_found",
    }
    assert result.docs is not None and result.docs.exists()
    assert result.run_name.startswith("validate_curated-")  # never GX's `__none__`
    (page,) = (tmp_path / "docs2/validations").rglob("*.html")
    text = page_text(page)
    assert result.run_name in text and "Why it matters: a held-out task seen in training" in text
    assert f"{rows[-1]['trajectory_id']} train" in text  # the leaking row, named


def test_curated_gate_fails_a_small_narrow_set(batch: list[dict[str, Any]], tmp_path: Path) -> None:
    rows = [r for r in curated_set(batch, tmp_path / "c") if r["family"] == "order_status"]
    result = curated_gate(rows, tmp_path / "docs")
    failed = {r.check.expectation for r in result.failed}
    assert "ExpectTableRowCountToBeBetween" in failed
    assert "ExpectColumnDistinctValuesToContainSet" in failed


def test_stage_exits_non_zero_with_report_on_a_bad_batch(
    batch: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m tasks.validate_raw` on an ingested corrupted batch: exit 1, summary, Data Docs."""
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store params name

    from tasks import validate_raw

    src = tmp_path / "logs"
    src.mkdir()
    (src / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corrupt(batch)))
    paths = paths_under(tmp_path) | {"raw_logs": str(src)}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {"paths": paths, "tracking": tracking_under(tmp_path), "ingest": {"source": str(src)}}
        )
    )
    from tasks import ingest as ingest_stage

    ingest_stage.main([str(params_file)])
    with pytest.raises(SystemExit) as exit_info:
        validate_raw.main([str(params_file)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "GX gate 'raw' FAILED" in err and "unanswered_calls" in err
    assert (tmp_path / "reports/gx/raw/index.html").exists()
    # each stage has its MLflow run: the ingest with its counts, the failed gate FAILED
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_under(tmp_path)["tracking_uri"])
    experiment = client.get_experiment_by_name("tracetune")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs["ingest"].info.status == "FINISHED" and runs["ingest"].data.metrics["accepted"] > 0
    assert runs["validate_raw"].info.status == "FAILED"
    assert runs["validate_raw"].data.metrics["rows"] > 0
    names = {a.path for a in client.list_artifacts(runs["validate_raw"].info.run_id)}
    assert "validate_raw.json" in names
    assert (tmp_path / "reports/gx/raw/summary.txt").read_text().startswith("GX gate 'raw' FAILED")
    assert not (tmp_path / "metrics/validate_raw.json").exists()


# --- conversations as another harness logs them (issue 18, item 3) ---------------------------
def ingest_records(records: list[dict[str, Any]], root: Path) -> Any:
    (root / "logs").mkdir(parents=True)
    (root / "logs/foreign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = IngestPaths(root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "r")
    report = ingest(IngestParams(source=str(root / "logs")), paths)
    return report, [orjson.loads(x) for x in iter_lines(paths.batches)]


@pytest.mark.parametrize("zeros", [False, True], ids=["no-usage", "zero-placeholders"])
def test_foreign_conversations_pass_the_raw_gate_with_estimated_usage(
    tmp_path: Path, zeros: bool
) -> None:
    """Issue 18: the raw gate failed 100% of a foreign harness's rows on role order (its
    conversations end with the user's goodbye or a hand-off tool result) and `total_tokens >= 1`
    (no usage logged). Usage is now estimated at ingest, marked, and never judged."""
    from foreign_support import foreign_runs

    foreign, _ = foreign_runs(120, seed=11, zeros=zeros)
    ends = {r["messages"][-1]["role"] for r in foreign}
    assert ends == {"assistant", "user", "tool"}
    report, records = ingest_records(foreign, tmp_path)
    assert report.quarantined == 0 and report.accepted == len(foreign)
    assert report.usage_estimated == len(foreign)
    assert report.as_dict()["usage_counted_with"] == "chars_per_token=4"
    for record in records:
        assert record["usage"]["estimated"] is True and record["cost_estimated"] is True
        assert record["usage"]["prompt_tokens"] > record["usage"]["completion_tokens"] > 0
        assert record["cost_usd"] > 0
        texts = [m.get("content") for m in record["messages"] if m["role"] == "assistant"]
        assert record["final_answer"] == [t for t in texts if t][-1]  # not the goodbye
    strict = RawGateParams(max_total_tokens=1, max_cost_usd=1e-9)  # estimates are not judged
    rows = (f.raw_row(r, KNOWN, n) for n, r in enumerate(records, 1))
    result = run_gate("raw", raw_checks(strict, KNOWN, NOW), f.RAW_COLUMNS, rows, tmp_path / "d")
    assert result.success, result.summary()
    assert {f.raw_row(r, KNOWN)["usage_estimated"] for r in records} == {1}


def test_logged_usage_is_still_judged(batch: list[dict[str, Any]], tmp_path: Path) -> None:
    """Only estimated numbers are exempt: a logged absurd usage still fails the gate."""
    bad = copy.deepcopy(batch)
    bad[0]["usage"] = {"prompt_tokens": 5_000_000, "completion_tokens": 1}
    result = raw_gate(bad, tmp_path / "docs")
    assert {r.check.column for r in result.failed} == {"total_tokens"}


def test_plain_text_tool_errors_count_in_the_gate(tmp_path: Path) -> None:
    """The raw gate's `tool_errors` column reads the same predicate as curation: an outage
    (most calls answered `Error: ...`) fails the gate."""
    from foreign_support import foreign_runs

    foreign, _ = foreign_runs(60, seed=3)
    rows = [f.raw_row(r, KNOWN) for r in foreign]
    assert any(r["tool_errors"] for r in rows)
    for record in foreign:
        for message in record["messages"]:
            if message["role"] == "tool":
                message["content"] = "Error: upstream service unavailable"
    for record in foreign:  # usage is not what this test is about
        record |= {"usage": {"prompt_tokens": 90, "completion_tokens": 10}, "cost_usd": 0.01}
    rows = [f.raw_row(r, KNOWN, n) for n, r in enumerate(foreign, 1)]
    result = run_gate(
        "raw", raw_checks(RawGateParams(), KNOWN, NOW), f.RAW_COLUMNS, iter(rows), tmp_path / "d"
    )
    assert {r.check.column for r in result.failed} == {"tool_errors"}


def test_gate_with_no_batch_says_nothing_to_validate_not_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No batch yet: the stage exits 0 (an incremental run may have nothing new) but its
    metrics and output say nothing was validated; it once wrote `success: true`."""
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store params name

    from tasks import validate_raw

    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump({"paths": paths_under(tmp_path), "tracking": tracking_under(tmp_path)})
    )
    validate_raw.main([str(params_file)])
    metrics = json.loads((tmp_path / "metrics/validate_raw.json").read_text())
    assert metrics["status"] == validate_raw.NOTHING_TO_VALIDATE
    assert metrics["success"] is None
    assert "NOTHING TO VALIDATE" in capsys.readouterr().out


# --- Data Docs a person understands (issue 22, item 6) ---------------------------------------
def page_text(html_file: Path) -> str:
    """A Data Docs page as the words a reader sees (tags, scripts and styles dropped)."""
    import html
    import re

    text = re.sub(r"<(script|style)\b.*?</\1>", " ", html_file.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def test_data_docs_name_failing_trajectories_by_log_line(
    sim_lines: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user could not act on the raw gate's Data Docs: GX's generic "values must belong to this
    set: 1, at least 99% of the time" with sampled value 0, no trajectory id, the batch file's
    line, epoch-second timestamps, run name `__none__`. Now each expectation says what it means
    and why, failing rows carry the trajectory id and the production log's file and line, and
    timestamps read as ISO 8601, under the run `validate_raw-<batch>`."""
    import yaml

    from tasks import ingest as ingest_stage
    from tasks import validate_raw

    records = [orjson.loads(line) for line in sim_lines[:30]]
    no_assistant = records[10]
    no_assistant["messages"] = [m for m in no_assistant["messages"] if m["role"] != "assistant"]
    from_the_future = records[12]
    from_the_future["timestamp"] = "2031-02-03T04:05:06+01:00"
    log = tmp_path / "logs/prod.jsonl"
    log.parent.mkdir()
    # a line ingest quarantines first: batch lines and log lines differ from here on
    log.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in records))
    params_file = tmp_path / "params.yaml"
    ingest_block = {"source": str(log.parent), "max_quarantine_rate": 0.5}
    paths = paths_under(tmp_path)
    params_file.write_text(yaml.safe_dump({"paths": paths, "ingest": ingest_block}))
    ingest_stage.main([str(params_file)])
    batch = Path(paths["ingested"]) / "batch-000001.jsonl"
    batch_ids = [orjson.loads(x)["trajectory_id"] for x in iter_lines(batch)]
    tid = no_assistant["trajectory_id"]
    log_line = 12  # the junk line, then records[0..10]
    assert batch_ids.index(tid) + 1 != log_line  # the old report's `line=` was the batch's

    with pytest.raises(SystemExit):
        validate_raw.main([str(params_file)])
    summary = capsys.readouterr().err
    assert f"trajectory_id={tid}, source={log}, line={log_line}" in summary
    assert "run validate_raw-batch-000001" in summary

    docs = tmp_path / "reports/gx/raw"
    (page,) = (docs / "validations").rglob("*.html")
    text = page_text(page)
    assert "validate_raw-batch-000001" in text and "__none__" not in text
    assert (  # the plain-language note replaces GX's generic wording
        "Every message has a known role (system, user, assistant, tool) and the conversation "
        "has at least one assistant turn" in text
    )
    assert (
        "Why it matters: a conversation without an assistant turn teaches the model nothing" in text
    )
    assert "Rule: roles_ok = 1 in at least 99.0% of trajectories." in text
    assert "values must belong to this set" not in text
    # the failing row: its value, count, then trajectory id, log file and the log's line
    assert f"0 1 {tid} {log} {log_line} " in text
    # timestamps as ISO 8601 in UTC, the bounds too
    assert f"2031-02-03T03:05:06Z 1 {from_the_future['trajectory_id']} {log} 14 " in text
    assert "logged between 2020-01-01T00:00:00Z and now" in text
    assert str(int(datetime(2031, 2, 3, 3, 5, 6, tzinfo=UTC).timestamp())) not in text  # no epoch
    # the suite page says the same for every expectation, passing ones included
    suite = page_text(docs / "expectations/raw_gate.html")
    assert suite.count("Why it matters:") == len(raw_checks(RawGateParams(), KNOWN, NOW))


def test_rows_point_at_the_log_line_or_say_they_do_not(tmp_path: Path) -> None:
    """`with_origins` takes the log file and line ingest recorded; a trajectory the index does
    not know (ingested before origins were kept) keeps the batch file and its line."""
    rows = [
        {"trajectory_id": t, "source": "batch-000001.jsonl", "line": n}
        for n, t in enumerate(["a", "b", None], 1)
    ]
    known = {"a": ("s3://logs/x.jsonl", 40)}
    out = list(f.with_origins(rows, lambda ids: {i: known[i] for i in ids if i in known}, 2))
    assert [(r["source"], r["line"]) for r in out] == [
        ("s3://logs/x.jsonl", 40),
        ("batch-000001.jsonl", 2),
        ("batch-000001.jsonl", 3),
    ]
    from tracetune.trajectories.ingest import read_origins

    assert read_origins(tmp_path / "absent.sqlite", ["a"]) == {}
    old = tmp_path / "old.sqlite"  # an index from before origins were kept
    import sqlite3

    sqlite3.connect(old).execute("CREATE TABLE ids (id TEXT PRIMARY KEY)").connection.close()
    assert read_origins(old, ["a"]) == {}


@pytest.mark.parametrize("columns", [{"a": "TEXT"}, {"a": "TEXT", "b": "INTEGER", "c": "REAL"}])
def test_load_rows_stores_each_column_of_each_row(tmp_path: Path, columns: dict[str, str]) -> None:
    """Rows with extra keys and in any key order land column by column (one column too), over
    more than one insert batch."""
    import sqlite3

    from tracetune.data.gates import INSERT_BATCH, TABLE, load_rows

    n = INSERT_BATCH + 3
    rows = [{"z": "extra", "c": i / 2, "b": i, "a": f"t-{i}"} for i in range(n)]
    assert load_rows(tmp_path / "r.sqlite", columns, iter(rows)) == n
    conn = sqlite3.connect(tmp_path / "r.sqlite")
    stored = conn.execute(f"SELECT {', '.join(columns)} FROM {TABLE} ORDER BY _row").fetchall()
    conn.close()
    assert stored == [tuple(row[c] for c in columns) for row in rows]
