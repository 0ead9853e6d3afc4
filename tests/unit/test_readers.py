"""Log-format readers: detection by content, each format's shapes, and the mapping they feed."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tracetune.config import FieldMapping, IngestParams
from tracetune.trajectories.ingest import IngestPaths, ingest
from tracetune.trajectories.mapping import MappingError, apply_mapping, as_score, get_path, pop_path
from tracetune.trajectories.readers import READERS, UnrecognisedFormat, detect
from tracetune.trajectories.readers.base import ReadError
from tracetune.trajectories.readers.mlflow_traces import assessments, output_message
from tracetune.trajectories.readers.openai_chat import normalise_messages
from tracetune.trajectories.readers.otel_genai import any_value, hex_id
from tracetune.trajectories.sources import LocalSource

CONVERSATION = [
    {"role": "user", "content": "Where is O-1?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
    {"role": "assistant", "content": "O-1 has shipped."},
]
RUN = {"task_id": 7, "reward": 1, "messages": CONVERSATION}
OURS = {
    "trajectory_id": "t-1",
    "task_id": "order_status:O-1",
    "family": "order_status",
    "timestamp": "2026-11-01T00:00:00+00:00",
    "model": "m",
    "messages": CONVERSATION,
    "success": True,
    "steps": 2,
    "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    "cost_usd": 0.001,
    "latency_s": 1.0,
}


def detected(path: Path, fmt: str = "auto", mapping: FieldMapping | None = None) -> Any:
    source = LocalSource(path)
    (obj,) = source.objects()
    return detect(source, obj, fmt, mapping or FieldMapping())


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --- detection by content ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "reader", "document"),
    [
        ("ours.log", jsonl(OURS, OURS), "tracetune", False),
        ("runs.jsonl", jsonl(RUN, RUN), "openai_chat", False),
        ("runs.data", json.dumps([RUN, RUN]), "openai_chat", True),
        ("runs.json", json.dumps([RUN, RUN], indent=2), "openai_chat", True),
        ("runs.json", json.dumps({"meta": {"n": 2}, "runs": [RUN, RUN]}), "openai_chat", True),
        ("bare.jsonl", jsonl(CONVERSATION, CONVERSATION), "openai_chat", False),
        ("one.json", json.dumps(RUN, indent=2), "openai_chat", True),
        ("ours.json", json.dumps([OURS]), "tracetune", True),
        ("damaged.jsonl", '{"trajectory_id": "t-0", "ta\n' + jsonl(OURS), "tracetune", False),
        ("otlp.jsonl", jsonl({"resourceSpans": []}, {"resourceSpans": []}), "otel_genai", True),
        ("otlp.json", json.dumps({"resourceSpans": []}, indent=1), "otel_genai", True),
        (
            "trace.json",
            jsonl({"info": {"trace_id": "tr-1"}, "data": {"spans": []}}),
            "mlflow_traces",
            False,
        ),
    ],
)
def test_the_content_not_the_name_says_the_format(
    tmp_path: Path, name: str, content: str, reader: str, document: bool
) -> None:
    (tmp_path / name).write_text(content)
    found = detected(tmp_path / name)
    assert (found.reader.name, found.document) == (reader, document)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"accuracy": 0.9}', "JSON Lines of a JSON object with keys [accuracy]"),
        ('{\n "accuracy": 0.9\n}', "one JSON document, a JSON object with keys [accuracy]"),
        ("id,reward\n1,0\n", "neither JSON Lines nor a JSON document (it starts: 'id,reward')"),
        ('{"prompt": "p"}\n{"prompt": "q"}\n', "JSON Lines of a JSON object with keys [prompt]"),
        ('[{"prompt": "p"}]', "one JSON document, a JSON array of 1 (the first: a JSON object"),
    ],
)
def test_what_no_reader_knows_is_an_error_naming_the_object(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(UnrecognisedFormat, match=re.escape(message)) as info:
        detected(tmp_path / "x.json")
    assert str(info.value).startswith(str(tmp_path / "x.json"))


def test_several_lists_in_one_object_are_the_users_call(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"train": [RUN], "test": [RUN]}))
    with pytest.raises(UnrecognisedFormat, match="several lists of records \\(train, test\\)"):
        ingest(IngestParams(source=str(path)), paths(tmp_path))


def test_a_mapping_describes_an_unknown_layout_and_a_format_can_be_forced(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(jsonl({"conversation": CONVERSATION}))
    mapping = FieldMapping(fields={"messages": "conversation"})
    assert detected(path, mapping=mapping).reader.name == "tracetune"
    assert detected(path, "openai_chat").reader.name == "openai_chat"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert detected(tmp_path / "empty.jsonl") is None  # a log just rotated in: nothing to read


def paths(root: Path) -> IngestPaths:
    return IngestPaths(root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "r")


def test_a_json_file_is_read_not_silently_skipped(tmp_path: Path) -> None:
    """Regression: a `.json` source was listed as nothing (`ingest: nothing new`, exit 0)."""
    runs = [RUN | {"task_id": i} for i in range(5)] + [
        {"task_id": 9, "reward": 0, "messages": "not a list"}
    ]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/runs.json").write_text(json.dumps(runs))
    mapping = FieldMapping(
        derive_id="content",
        success_from_reward="reward",
        defaults={
            "family": "order_status",
            "model": "m",
            "timestamp": "2026-11-01T00:00:00+00:00",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "cost_usd": 0,
            "latency_s": 0,
        },
    )
    params = IngestParams(source=str(tmp_path / "logs"), mapping=mapping, max_quarantine_rate=0.5)
    report = ingest(params, paths(tmp_path))
    assert (report.read, report.accepted, report.quarantined) == (6, 5, 1)
    assert report.reasons == {"schema:messages": 1}
    record = json.loads((tmp_path / "q/batch-000001.jsonl").read_text())
    assert record["line"] == 6  # the element's number in the array


# --- OpenAI chat shapes ------------------------------------------------------------------------
def test_openai_chat_shapes_become_our_messages() -> None:
    messages = normalise_messages(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, "b"], "name": None},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": {"x": 1}},
            },
            {"role": "function", "name": "f", "content": {"answer": 42}},
            {
                "role": "assistant",
                "content": [{"type": "output_text", "text": "It is 42.", "annotations": []}],
                "refusal": None,
                "annotations": [],
                "tool_calls": [{"id": "c2", "function": {"name": "g"}}],
            },
        ]
    )
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "fc_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": 1}'},
                }
            ],
        },
        {"role": "tool", "name": "f", "content": '{"answer": 42}', "tool_call_id": "fc_1"},
        {
            "role": "assistant",
            "content": "It is 42.",
            "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}
            ],
        },
    ]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "content_part"),
        ([{"role": "function", "content": "x"}], "function_call"),
    ],
)
def test_what_cannot_be_trained_on_is_quarantined_with_its_reason(
    messages: list[dict[str, Any]], reason: str
) -> None:
    with pytest.raises(ReadError) as info:
        READERS["openai_chat"].to_record({"messages": messages}, FieldMapping())
    assert info.value.reason == f"openai_chat:{reason}"


# --- mapping where real logs need it -----------------------------------------------------------
def test_ids_derived_composed_and_normalised() -> None:
    composed = FieldMapping(derive_id=["task_id", "trial"], drop=["trial"])
    record = apply_mapping({"task_id": 12, "trial": 0.0, "messages": []}, composed)
    assert (record["trajectory_id"], record["task_id"]) == ("12:0", "12")
    assert "trial" not in record
    logged = apply_mapping({"trajectory_id": 5, "task_id": 1, "trial": 2}, composed)
    assert logged["trajectory_id"] == "5"  # a logged id wins, and becomes a string
    with pytest.raises(MappingError, match="'trial'"):
        apply_mapping({"task_id": 12}, composed)

    by_content = FieldMapping(derive_id="content")
    a = apply_mapping(dict(RUN), by_content)["trajectory_id"]
    assert a == apply_mapping(dict(RUN), by_content)["trajectory_id"] and a.startswith("c-")
    assert a != apply_mapping(RUN | {"reward": 0}, by_content)["trajectory_id"]
    assert apply_mapping({"task_id": True}, FieldMapping())["task_id"] == "true"


@pytest.mark.parametrize(
    ("value", "score"),
    [(1, 1.0), (0.25, 0.25), (True, 1.0), ("0.8", 0.8), ("yes", 1.0), ("FAIL", 0.0), ("pass", 1.0)],
)
def test_success_from_a_score_or_a_label(value: Any, score: float) -> None:
    assert as_score(value, "r") == score
    mapping = FieldMapping(success_from_reward="r", success_threshold=0.5)
    assert apply_mapping({"r": value}, mapping)["success"] is (score >= 0.5)


def test_family_from_a_field_shared_with_the_task_or_a_constant() -> None:
    shared = FieldMapping(fields={"task_id": "task", "family": "task"})
    assert apply_mapping({"task": "refund"}, shared) == {"task_id": "refund", "family": "refund"}
    constant = FieldMapping(defaults={"family": "support"})
    assert apply_mapping({}, constant)["family"] == "support"


def test_dotted_paths_reach_keys_with_dots() -> None:
    record = {"attributes": {"gen_ai.request.model": "m", "app": {"x": 1}}, "tags": {"a.b": 2}}
    assert get_path(record, "attributes.gen_ai.request.model") == "m"
    assert get_path(record, "attributes.app.x") == 1
    assert pop_path(record, "tags.a.b") == 2 and "tags" not in record


# --- OpenTelemetry and MLflow details ----------------------------------------------------------
def test_otlp_values_and_ids() -> None:
    assert hex_id("MHvHp3zuaet09+QGs3ZATQ==") == "307bc7a77cee69eb74f7e406b376404d"
    assert hex_id("307BC7A77CEE69EB74F7E406B376404D") == "307bc7a77cee69eb74f7e406b376404d"
    kv = {"kvlistValue": {"values": [{"key": "n", "value": {"intValue": "3"}}]}}
    assert any_value({"arrayValue": {"values": [kv, {"doubleValue": 0.5}]}}) == [{"n": 3}, 0.5]


def test_an_otel_trace_without_a_chat_span_is_quarantined(tmp_path: Path) -> None:
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "http", "startTimeUnixNano": "1"}
    doc = {"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": [span]}]}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    report = ingest(
        IngestParams(source=str(tmp_path / "t.json"), max_quarantine_rate=1), paths(tmp_path)
    )
    assert (report.read, report.reasons) == (1, {"otel_genai:no_chat_span": 1})


def test_mlflow_labels_and_outputs() -> None:
    items: list[dict[str, Any]] = [
        {"assessment_name": "ok", "feedback": {"value": False}, "create_time": "2026-01-01"},
        {"assessment_name": "ok", "feedback": {"value": True}, "create_time": "2026-01-02"},
        {
            "assessment_name": "ok",
            "feedback": {"value": False},
            "create_time": "2026-01-03",
            "valid": False,
        },
        {"assessment_name": "judge", "feedback": {"value": None, "error": {"error_code": "X"}}},
        {"assessment_name": "answer", "expectation": {"value": "42"}},
    ]
    assert assessments(items) == {"ok": True, "answer": "42"}
    message = {"role": "assistant", "content": "hi"}
    assert output_message({"choices": [{"message": message}]}) == message
    assert output_message("hi") == message and output_message(message) == message
    assert output_message({"message": message}) == message and output_message(3) is None


def test_a_gzip_json_array_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "r.json.gz").write_bytes(gzip.compress(json.dumps([RUN]).encode()))
    found = detected(tmp_path / "r.json.gz")
    assert (found.reader.name, found.document) == ("openai_chat", True)


def test_mlflow_traces_are_a_parameter_not_a_source() -> None:
    """DVC hashes `ingest.source` as the stage's dependency and knows no mlflow:// scheme."""
    from tracetune.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"ingest\.source: .*ingest\.mlflow_experiment"):
        parse_params({"ingest": {"source": "mlflow://agent-prod"}})


def test_document_items_give_the_same_batch_with_workers(tmp_path: Path) -> None:
    runs = [RUN | {"task_id": i, "reward": i % 2} for i in range(30)]
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    mapping = FieldMapping(
        derive_id=["task_id"],
        success_from_reward="reward",
        defaults={
            "family": "order_status",
            "model": "m",
            "timestamp": "2026-11-01T00:00:00+00:00",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "cost_usd": 0,
            "latency_s": 0,
        },
    )
    out = []
    for workers in (1, 2):
        params = IngestParams(source=str(tmp_path / "runs.json"), mapping=mapping, workers=workers)
        report = ingest(params, paths(tmp_path / str(workers)))
        assert (report.read, report.accepted) == (30, 30)
        out.append((tmp_path / str(workers) / "b/batch-000001.jsonl").read_bytes())
    assert out[0] == out[1]


def test_a_changed_document_is_read_again_whole_and_a_touched_one_not_at_all(
    tmp_path: Path,
) -> None:
    import os
    import time

    path = tmp_path / "runs.json"
    mapping = FieldMapping(
        derive_id=["task_id"],
        success_from_reward="reward",
        defaults={
            "family": "order_status",
            "model": "m",
            "timestamp": "2026-11-01T00:00:00+00:00",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "cost_usd": 0,
            "latency_s": 0,
        },
    )
    params = IngestParams(source=str(path), mapping=mapping)
    path.write_text(json.dumps([RUN | {"task_id": i} for i in range(3)]))
    assert ingest(params, paths(tmp_path)).accepted == 3
    later = time.time() + 5
    os.utime(path, (later, later))  # touched: same bytes
    touched = ingest(params, paths(tmp_path))
    assert (touched.read, touched.batch) == (0, None)
    path.write_text(json.dumps([RUN | {"task_id": i} for i in range(4)]))  # one run more
    grown = ingest(params, paths(tmp_path))
    assert (grown.read, grown.accepted, grown.duplicates) == (4, 1, 3)
