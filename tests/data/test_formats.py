"""Each log format production agents write goes through the real stages: ingest (counts add up,
the watermark holds), then the raw gate, curation, the split, the curated gate and a short run
of the unchanged `sft` stage (two steps on the tiny base, documented params only: `base_model.name_or_path`,
`sft.max_steps`, `sft.batch_size`, `sft.logging_steps`).

Fixtures are written by the formats' own libraries (tests/formats_support.py): another
harness's JSON array of OpenAI chat runs, MLflow traces logged with MLflow's tracing API into a
real SQLite store, GenAI spans recorded by the OpenTelemetry SDK and encoded as OTLP/JSON.
"""

from __future__ import annotations

import json
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import pytest
from formats_support import (
    GOODBYE,
    HARNESS_MAPPING,
    MLFLOW_MAPPING,
    OTEL_MAPPING,
    episodes,
    harness_runs,
    hex_ids,
    log_outcomes,
    otlp_json,
    with_handoff,
    write_json,
    write_mlflow_traces,
)
from params_support import paths_under, tracking_under

from tasks import curate as curate_stage
from tasks import ingest as ingest_stage
from tasks import split as split_stage
from tasks import validate_curated, validate_raw
from tracetune.config import Params, parse_params
from tracetune.trajectories.ingest import QuarantineRateExceeded
from tracetune.trajectories.io import iter_lines, read_trajectories
from tracetune.trajectories.schema import Trajectory


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test talks to the store its params name: `mlflow.set_tracking_uri` (a stage run)
    also exports MLFLOW_TRACKING_URI, which tracetune lets override params.yaml."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return episodes(36)


def project(
    root: Path,
    source: str,
    mapping: dict[str, Any],
    tracking_root: Path | None = None,
    **ingest: Any,
) -> Params:
    return parse_params(
        {
            "paths": paths_under(root),
            "tracking": tracking_under(tracking_root or root),
            "ingest": {"source": source, "mapping": mapping} | ingest,
            "gates": {"curated": {"min_rows": 5, "required_families": ["order_status"]}},
            "split": {"heldout_fraction": 0.3, "heldout_families": ["order_status"], "seed": 1},
        }
    )


def plain_id(task_id: str) -> str:
    """Task ids holding an email are pseudonymised at ingest: compare the rest."""
    return task_id.split(":")[0] if "@" in task_id else task_id


def batch(params: Params) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in iter_lines(params.paths.ingested)]


def counts_add_up(summary: dict[str, Any], read: int) -> None:
    assert summary["read"] == read, summary
    assert summary["accepted"] + summary["quarantined"] == summary["read"], summary


def curate_and_split(params: Params) -> dict[str, Any]:
    curated = curate_stage.run(params)
    assert curated["input"] == len(batch(params)) and curated["kept"] > 0, curated
    summary = split_stage.run(params)
    split = summary["split"]
    assert split["train"] > 0 and split["train"] + split["heldout"] == curated["kept"], split
    train = list(read_trajectories(params.paths.curated_dir / "train.jsonl"))
    assert all(t.success for t in train)
    validate_curated.run(params)
    return summary


def short_sft(params: Params, base: Path) -> None:
    """Two steps of the real `sft` stage on what the format's logs became: the data trains
    (long conversations are windowed, tool schemas come from the environment)."""
    import math

    from tasks import sft as sft_stage

    trained = params.model_copy(
        update={
            "base_model": params.base_model.model_copy(update={"name_or_path": str(base)}),
            "sft": params.sft.model_copy(
                update={"max_steps": 2, "batch_size": 2, "logging_steps": 1}
            ),
        }
    )
    result = sft_stage.run(trained)
    assert result.steps == 2 and result.examples > 0, result
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert (params.paths.models / "sft" / "merged" / "config.json").exists()


# --- another harness's file: a JSON array of OpenAI chat runs ----------------------------------
def test_harness_runs_as_a_json_array_are_ingested(
    tmp_path: Path, records: list[dict[str, Any]], tiny_base: Path
) -> None:
    runs = harness_runs(records)
    write_json(tmp_path / "logs/runs.json", runs)  # a .json file: once silently ignored
    params = project(tmp_path, str(tmp_path / "logs"), HARNESS_MAPPING)
    summary = ingest_stage.run(params)
    counts_add_up(summary, len(runs))
    assert summary["accepted"] == len(runs) and summary["batch"] == 1
    rows = batch(params)
    assert [r["trajectory_id"] for r in rows] == [f"{r['task_id']}:{r['trial']}" for r in runs]
    assert [r["task_id"] for r in rows] == [str(r["task_id"]) for r in runs]
    assert [r["success"] for r in rows] == [r["reward"] == 1 for r in runs]
    assert [r["family"] for r in rows] == [r["info"]["family"] for r in runs]
    for row, run in zip(rows, runs, strict=True):
        Trajectory.model_validate(row)
        assert row["steps"] == sum(m["role"] == "assistant" for m in run["messages"])
        assert all(isinstance(m.get("content", ""), str | None) for m in row["messages"])
    legacy = [r for r, run in zip(rows, runs, strict=True) if run["messages"] != r["messages"]]
    assert any(m["role"] == "tool" for r in legacy for m in r["messages"])
    assert {rows[0]["messages"][-1]["content"], rows[5]["messages"][-1]["content"]} == {
        GOODBYE,
        "Transfer successful",
    }
    again = ingest_stage.run(params)  # the watermark: nothing new, nothing re-read
    assert again["batch"] is None and again["read"] == 0 and again["files"] == {"unchanged": 1}
    assert validate_raw.run(params)["success"]  # conversations as they are, usage estimated
    curate_and_split(params)
    short_sft(params, tiny_base)


@pytest.mark.parametrize("container", ["jsonl", "object", "pretty_jsonl_gz"])
def test_every_container_of_the_same_runs_gives_the_same_batch(
    tmp_path: Path, records: list[dict[str, Any]], container: str
) -> None:
    import gzip

    runs = harness_runs(records[:12])
    ref = project(tmp_path / "ref", str(write_json(tmp_path / "ref.json", runs)), HARNESS_MAPPING)
    ingest_stage.run(ref)
    if container == "jsonl":  # named .txt: the name says nothing, the content says JSON Lines
        src = tmp_path / "runs.txt"
        src.write_text("".join(json.dumps(r) + "\n" for r in runs))
    elif container == "object":
        src = write_json(tmp_path / "export.json", {"version": 2, "runs": runs})
    else:
        src = tmp_path / "runs.json.gz"
        src.write_bytes(gzip.compress(json.dumps(runs, indent=1).encode()))
    params = project(tmp_path / "out", str(src), HARNESS_MAPPING)
    counts_add_up(ingest_stage.run(params), len(runs))
    assert batch(params) == batch(ref)


def test_harness_runs_pass_the_raw_gate(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """Conversations ending with the user's goodbye or a hand-off result, and no usage logged:
    the gate once failed these on role order and `total_tokens >= 1` for every row."""
    write_json(tmp_path / "logs/runs.json", harness_runs(records))
    params = project(tmp_path, str(tmp_path / "logs"), HARNESS_MAPPING)
    summary = ingest_stage.run(params)
    assert summary["usage_estimated"] == summary["accepted"] > 0
    assert validate_raw.run(params)["success"]


# --- MLflow Tracing ------------------------------------------------------------------------------
def args_parse(record: dict[str, Any]) -> bool:
    """No malformed arguments: 10 traces are too few for the gate's 15% allowance of them."""
    calls = [c for m in record["messages"] for c in m.get("tool_calls") or ()]
    return all(isinstance(json.loads(c["function"]["arguments"] or "0"), dict) for c in calls)


@pytest.fixture(scope="module")
def traced(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def ok(record: dict[str, Any]) -> bool:
        try:
            return args_parse(record)
        except json.JSONDecodeError:
            return False

    return [r for r in records if ok(r)][:12]


@pytest.fixture(scope="module")
def mlflow_store(
    tmp_path_factory: pytest.TempPathFactory, traced: list[dict[str, Any]]
) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("mlflow")
    ids = write_mlflow_traces(traced[:10], tracking_under(root), "agent-prod")
    write_mlflow_traces([with_handoff(traced[0])], tracking_under(root), "agent-handoff")
    return root, ids


def test_mlflow_traces_through_ingest_gate_curate_split(
    tmp_path: Path,
    traced: list[dict[str, Any]],
    mlflow_store: tuple[Path, list[str]],
    tiny_base: Path,
) -> None:
    import shutil

    store, ids = mlflow_store
    root = tmp_path / "project"
    shutil.copytree(store, root)  # the same store, so this test may add to it
    (root / "logs").mkdir()
    params = project(root, str(root / "logs"), MLFLOW_MAPPING, mlflow_experiment="agent-prod")
    summary = ingest_stage.run(params)
    counts_add_up(summary, 10)
    assert summary["accepted"] == 10
    rows = {r["trajectory_id"]: r for r in batch(params)}
    assert sorted(rows) == sorted(ids)
    for trace_id, record in zip(ids, traced, strict=False):
        row = rows[trace_id]
        assert plain_id(row["task_id"]) == plain_id(record["task_id"])
        assert row["family"] == record["family"]
        assert row["success"] is record["success"] and row["model"] == record["model"]
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in record["messages"]]
        assert row["usage"]["prompt_tokens"] > 0 and row["steps"] == record["steps"]
    assert validate_raw.run(params)["success"]
    curate_and_split(params)

    # The watermark: trace ids already read are not read again; a new trace is, once it has
    # its label (without it the batch is rejected whole and the watermark stays).
    assert ingest_stage.run(params)["read"] == 0
    tracking = tracking_under(root)
    new = write_mlflow_traces(traced[10:11], tracking, "agent-prod", feedback=False)
    with pytest.raises(QuarantineRateExceeded, match="1 of 1 lines"):
        ingest_stage.run(params)
    log_outcomes(new, traced[10:11], tracking)
    third = ingest_stage.run(params)
    assert (third["read"], third["accepted"], third["files"]) == (1, 1, {"new": 1, "unchanged": 10})
    assert {r["trajectory_id"] for r in batch(params)} == {*ids, *new}

    # A trace read before its label arrived (quarantined, committed) is read again with it.
    tolerant = params.model_copy(
        update={"ingest": params.ingest.model_copy(update={"max_quarantine_rate": 1.0})}
    )
    late = write_mlflow_traces(traced[11:12], tracking, "agent-prod", feedback=False)
    fourth = ingest_stage.run(tolerant)
    assert (fourth["read"], fourth["quarantine_reasons"]) == (1, {"mapping": 1})
    log_outcomes(late, traced[11:12], tracking)
    fifth = ingest_stage.run(tolerant)
    assert (fifth["read"], fifth["accepted"], fifth["files"]["rewritten"]) == (1, 1, 1)
    assert late[0] in {r["trajectory_id"] for r in batch(params)}
    short_sft(params, tiny_base)  # last: a stage run moves MLflow's global tracking state


def test_a_trace_that_ends_on_a_tool_result_keeps_it(
    tmp_path: Path, traced: list[dict[str, Any]], mlflow_store: tuple[Path, list[str]]
) -> None:
    """The hand-off's result is in the tool's span only (no model call saw it): MLflow TOOL
    span outputs, OTel `execute_tool` spans' `gen_ai.tool.call.result`."""
    store, _ = mlflow_store
    expected = with_handoff(traced[0])
    (tmp_path / "logs").mkdir()
    from_mlflow = project(
        tmp_path / "a",
        str(tmp_path / "logs"),
        MLFLOW_MAPPING,
        tracking_root=store,
        mlflow_experiment="agent-handoff",
    )
    otlp = write_json(tmp_path / "otlp.json", otlp_json([expected]))
    from_otel = project(tmp_path / "b", str(otlp), OTEL_MAPPING)
    for params in (from_mlflow, from_otel):
        assert ingest_stage.run(params)["accepted"] == 1
        (row,) = batch(params)
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in expected["messages"]]
        assert row["messages"][-1] == expected["messages"][-1]
        assert row["messages"][-1]["content"] == "Transfer successful"


def test_mlflow_traces_exported_to_a_file_read_as_from_the_store(
    tmp_path: Path, mlflow_store: tuple[Path, list[str]]
) -> None:
    """`Trace.to_json()` lines (an export, another store's traces) give the same trajectories."""
    from mlflow import MlflowClient

    store, ids = mlflow_store
    client = MlflowClient(tracking_under(store)["tracking_uri"])
    (tmp_path / "logs").mkdir()
    (tmp_path / "export.jsonl").write_text(
        "".join(client.get_trace(i).to_json() + "\n" for i in ids)
    )
    from_store = project(
        tmp_path / "a",
        str(tmp_path / "logs"),
        MLFLOW_MAPPING,
        store,
        mlflow_experiment="agent-prod",
    )
    from_file = project(tmp_path / "b", str(tmp_path / "export.jsonl"), MLFLOW_MAPPING)
    counts_add_up(ingest_stage.run(from_store), 10)
    counts_add_up(ingest_stage.run(from_file), 10)
    key = itemgetter("trajectory_id")
    assert sorted(batch(from_file), key=key) == sorted(batch(from_store), key=key)


def test_mlflow_trace_without_its_label_is_quarantined_with_the_reason(
    tmp_path: Path, mlflow_store: tuple[Path, list[str]]
) -> None:
    store, _ = mlflow_store
    mapping = MLFLOW_MAPPING | {"success_from_reward": "assessments.no_such_judge"}
    (tmp_path / "logs").mkdir()
    params = project(
        tmp_path,
        str(tmp_path / "logs"),
        mapping,
        tracking_root=store,
        mlflow_experiment="agent-prod",
        max_quarantine_rate=1.0,
    )
    summary = ingest_stage.run(params)
    counts_add_up(summary, 10)
    assert summary["quarantine_reasons"] == {"mapping": 10}


# --- OpenTelemetry GenAI -------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["attributes", "events", "openllmetry"])
def test_otel_genai_spans_through_ingest_gate_curate_split(
    tmp_path: Path, records: list[dict[str, Any]], style: str, tiny_base: Path
) -> None:
    document = otlp_json(records, style)
    write_json(tmp_path / "otlp/export.json", document)  # protobuf JSON: ids in base64
    params = project(tmp_path, str(tmp_path / "otlp"), OTEL_MAPPING)
    summary = ingest_stage.run(params)
    counts_add_up(summary, len(records))
    assert summary["accepted"] == len(records)
    rows = batch(params)
    assert all(len(r["trajectory_id"]) == 32 for r in rows)  # hex trace ids
    assert [plain_id(r["task_id"]) for r in rows] == [plain_id(r["task_id"]) for r in records]
    assert [r["success"] for r in rows] == [r["success"] for r in records]
    for row, record in zip(rows, records, strict=True):
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in record["messages"]]
        assert row["timestamp"][:19] == record["timestamp"][:19]
        assert row["latency_s"] == pytest.approx(record["latency_s"], abs=1e-6)
    assert validate_raw.run(params)["success"]
    curate_and_split(params)
    if style == "attributes":  # one SFT run for the format; the styles give the same data
        short_sft(params, tiny_base)


def test_otlp_json_lines_with_hex_ids_give_the_same_trajectories(
    tmp_path: Path, records: list[dict[str, Any]]
) -> None:
    """The Collector's file exporter: one request per line, ids in hex; a trace split across
    lines is put back together."""
    document = otlp_json(records[:6])
    base = project(tmp_path / "a", str(write_json(tmp_path / "a.json", document)), OTEL_MAPPING)
    ingest_stage.run(base)
    lines = hex_ids(json.loads(json.dumps(document)))
    spans = lines["resourceSpans"][0]["scopeSpans"][0]["spans"]
    half = len(spans) // 2
    requests = []
    for part in (spans[:half], spans[half:]):
        request = json.loads(json.dumps(lines))
        request["resourceSpans"][0]["scopeSpans"][0]["spans"] = part
        requests.append(json.dumps(request))
    (tmp_path / "traces.jsonl").write_text("\n".join(requests) + "\n")
    params = project(tmp_path / "b", str(tmp_path / "traces.jsonl"), OTEL_MAPPING)
    counts_add_up(ingest_stage.run(params), 6)
    assert batch(params) == batch(base)


# --- what no reader understands ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"results": {"accuracy": 0.9}, "n": 3}', "a JSON object with keys [n, results]"),
        (b"task,reward\n1,0\n", "neither JSON Lines nor a JSON document"),
        (b'[{"prompt": "hi", "completion": "hello"}]', "keys [completion, prompt]"),
        (b'{"prompt": "hi"}\n{"prompt": "yo"}\n', "JSON Lines of a JSON object with keys"),
    ],
)
def test_an_unreadable_file_exits_non_zero_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, why: str
) -> None:
    import yaml

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.jsonl").write_text(json.dumps(episodes(3)[0]) + "\n")
    (logs / "b.json").write_bytes(content)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump({"paths": paths_under(tmp_path), "ingest": {"source": str(logs)}})
    )
    with pytest.raises(SystemExit) as exit_info:
        ingest_stage.main([str(params_file)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert str(logs / "b.json") in err and why in err and "nothing was committed" in err
    assert not list((tmp_path / "data/ingested/batches").glob("*.jsonl"))
    assert not (tmp_path / "data/state/watermark.json").exists()
