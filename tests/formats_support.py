"""Realistic logs in the formats other agents write, made from simulated support-desk episodes.

Each writer uses the format's own library where one exists (MLflow's tracing API into a real
SQLite store, the OpenTelemetry SDK and its OTLP encoder), so the fixtures are what those
libraries really produce, not what we believe they produce.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from tracetune.config import parse_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.simulator import iter_log_lines

GOODBYE = "Thanks, that is all I needed. Bye!"


def episodes(n: int, seed: int = 21) -> list[dict[str, Any]]:
    """`n` simulated production episodes (our layout), faults and failures included."""
    # The fixtures were drawn before the skip_user_turn fault existed: keep those episodes.
    simulate = {"n_trajectories": n, "seed": seed, "faults": {"skip_user_turn": 0.0}}
    params = parse_params({"simulate": simulate})
    out = []
    for _, record, faults in iter_log_lines(SupportDesk(max_steps=60), params.simulate):
        if record is not None and "duplicate_session" not in faults:
            out.append(record)
    return out


# --- another harness's file: OpenAI chat runs -------------------------------------------------
def harness_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What another harness logs: integer task ids, a trial number but no run id, reward 0/1,
    no token usage, conversations that end with the user's goodbye or a hand-off tool result,
    content sometimes as parts, arguments sometimes as objects, some legacy function calls."""
    task_numbers: dict[str, int] = {}
    runs = []
    for i, record in enumerate(records):
        number = task_numbers.setdefault(record["task_id"], 100 + len(task_numbers))
        messages = copy.deepcopy(record["messages"])
        if i % 4 == 0:  # content as a list of parts
            for m in messages:
                if m["role"] == "user" and isinstance(m["content"], str):
                    m["content"] = [{"type": "text", "text": m["content"]}]
        if i % 3 == 0:  # arguments logged as objects
            for m in messages:
                for call in m.get("tool_calls") or ():
                    call["function"]["arguments"] = loads_or_text(call["function"]["arguments"])
        if i % 7 == 3:
            messages = legacy_function_calls(messages)
        if i % 2 == 0:
            messages.append({"role": "user", "content": GOODBYE})
        elif i % 10 == 5:
            messages += handoff(i)
        runs.append(
            {
                "task_id": number,
                "trial": i % 3,
                "reward": 1 if record["success"] else 0,
                "info": {"family": record["family"], "policy_version": "2026-10"},
                "messages": messages,
            }
        )
    return runs


def loads_or_text(text: str) -> Any:
    """Arguments as the object they encode; malformed ones (agents write them) stay text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def legacy_function_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pre-tools API: `function_call` on the assistant turn, a `function` role result."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls") and len(m["tool_calls"]) == 1:
            function = m["tool_calls"][0]["function"]
            out.append({"role": "assistant", "content": None, "function_call": dict(function)})
        elif m["role"] == "tool" and out and "function_call" in out[-1]:
            name = out[-1]["function_call"]["name"]  # type: ignore[index]
            out.append({"role": "function", "name": name, "content": m["content"]})
        else:
            out.append(m)
    return out


def with_handoff(record: dict[str, Any]) -> dict[str, Any]:
    """The episode, then the customer asks for a person and the agent hands over: the
    conversation ends on the hand-off tool's result, which no model call saw."""
    record = copy.deepcopy(record)
    messages = handoff(0)
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"summary": "wants more"}'
    record["messages"] += messages
    record["steps"] += 1
    return record


def handoff(i: int) -> list[dict[str, Any]]:
    """The agent hands the customer to a human: the conversation ends on the tool's result."""
    call = {
        "id": f"handoff_{i}",
        "type": "function",
        "function": {"name": "transfer_to_human_agents", "arguments": {"summary": "wants more"}},
    }
    return [
        {"role": "user", "content": "Can I talk to a person?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"handoff_{i}", "content": "Transfer successful"},
    ]


HARNESS_MAPPING: dict[str, Any] = {
    "derive_id": ["task_id", "trial"],
    "fields": {"family": "info.family"},
    "success_from_reward": "reward",
    "drop": ["trial", "info"],
    "defaults": {
        "model": "harness-agent",
        "timestamp": "2026-11-01T00:00:00+00:00",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "cost_usd": 0.0,
        "latency_s": 0.0,
    },
}


# --- MLflow Tracing -----------------------------------------------------------------------------
def write_mlflow_traces(
    records: list[dict[str, Any]],
    tracking: dict[str, str],
    experiment: str,
    feedback: bool = True,
) -> list[str]:
    """Log each episode as an MLflow trace: an AGENT span (`@mlflow.trace`), a CHAT_MODEL span
    per model call (inputs: the messages so far; outputs: a ChatCompletion with usage), a TOOL
    span per tool call, task tags, and (with `feedback`) the outcome as human feedback.
    Returns the trace ids. `tracking` is params' `tracking` block (store, artifacts)."""
    import mlflow
    from mlflow.entities import SpanType

    with _store(tracking):
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=tracking["artifact_location"])
        mlflow.set_experiment(experiment)
        agent = mlflow.trace(_agent, name="support_agent", span_type=SpanType.AGENT)
        ids = []
        for record in records:
            agent(next(m["content"] for m in record["messages"] if m["role"] == "user"), record)
            trace_id = mlflow.get_last_active_trace_id()
            assert trace_id is not None
            ids.append(trace_id)
        mlflow.flush_trace_async_logging()
    if feedback:
        log_outcomes(ids, records, tracking)
    return ids


def log_outcomes(ids: list[str], records: list[dict[str, Any]], tracking: dict[str, str]) -> None:
    """The episodes' outcomes as human feedback (`resolved`) on their traces."""
    import mlflow
    from mlflow.entities import AssessmentSource

    with _store(tracking):
        for trace_id, record in zip(ids, records, strict=True):
            mlflow.log_feedback(
                trace_id=trace_id,
                name="resolved",
                value=bool(record["success"]),
                source=AssessmentSource(source_type="HUMAN", source_id="support-lead"),
            )


@contextmanager
def _store(tracking: dict[str, str]) -> Iterator[None]:
    """MLflow pointed at the test's store; its global URI and the variables it sets restored."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    try:
        with _use_tracking_uri(tracking["tracking_uri"]):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _agent(question: str, record: dict[str, Any]) -> str:
    """The instrumented agent: one chat span per model call, one tool span per tool call."""
    import mlflow
    from mlflow.entities import SpanType

    messages = record["messages"]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns:
        with mlflow.start_span("ChatCompletions", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": messages[:k], "model": record["model"]})
            span.set_outputs(
                {
                    "object": "chat.completion",
                    "model": record["model"],
                    "choices": [{"index": 0, "message": messages[k], "finish_reason": "stop"}],
                    "usage": {
                        "prompt_tokens": record["usage"]["prompt_tokens"] // len(turns),
                        "completion_tokens": record["usage"]["completion_tokens"] // len(turns),
                    },
                }
            )
        for call in messages[k].get("tool_calls") or ():
            result = next(m["content"] for m in messages if m.get("tool_call_id") == call["id"])
            with mlflow.start_span(call["function"]["name"], span_type=SpanType.TOOL) as tool:
                tool.set_inputs({"arguments": call["function"]["arguments"]})
                tool.set_outputs(result)
    mlflow.update_current_trace(tags={"task_id": record["task_id"], "family": record["family"]})
    return str(messages[-1].get("content"))


MLFLOW_MAPPING: dict[str, Any] = {
    "fields": {"task_id": "tags.task_id", "family": "tags.family"},
    "success_from_reward": "assessments.resolved",
    "defaults": {"cost_usd": 0.0},
}


# --- OpenTelemetry GenAI ------------------------------------------------------------------------
def otlp_json(records: list[dict[str, Any]], style: str = "attributes") -> dict[str, Any]:
    """Episodes as GenAI semantic-convention spans, recorded by the OpenTelemetry SDK and
    encoded by its OTLP encoder: the OTLP/JSON a collector's file exporter writes.

    `attributes`: the current conventions (`gen_ai.input.messages` / `gen_ai.output.messages`);
    `events`: the earlier one event per message (`gen_ai.user.message`, ...); `openllmetry`: the
    flat indexed attributes OpenLLMetry's instrumentations write (`gen_ai.prompt.0.role`, ...)."""
    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    # Flat indexed attributes need more than the SDK's default 128 per span (a long conversation
    # would lose its oldest attributes, the model name among them): deployments raise
    # OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT the same way.
    provider = TracerProvider(
        resource=Resource.create({"service.name": "support-agent"}),
        span_limits=SpanLimits(max_span_attributes=4096),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("support-agent")
    for record in records:
        messages = record["messages"]
        start = int(datetime.fromisoformat(record["timestamp"]).timestamp() * 1e9)
        end = start + int(record["latency_s"] * 1e9)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        root = tracer.start_span("invoke_agent support", start_time=start)
        root.set_attribute("gen_ai.operation.name", "invoke_agent")
        root.set_attribute("app.task_id", record["task_id"])
        root.set_attribute("app.family", record["family"])
        from opentelemetry import trace

        ctx = trace.set_span_in_context(root)
        for n, k in enumerate(turns):
            t0 = start + (n + 1) * 1000
            span = tracer.start_span(f"chat {record['model']}", context=ctx, start_time=t0)
            span.set_attribute("gen_ai.request.model", record["model"])
            span.set_attribute("gen_ai.response.model", record["model"])
            usage = record["usage"]
            if style == "openllmetry":
                span.set_attribute("llm.request.type", "chat")
                span.set_attribute("gen_ai.system", "openai")
                span.set_attribute("gen_ai.usage.prompt_tokens", usage["prompt_tokens"] // 2)
                span.set_attribute("gen_ai.usage.completion_tokens", usage["completion_tokens"])
                record_indexed(span, messages[:k], messages[k])
            else:
                span.set_attribute("gen_ai.operation.name", "chat")
                span.set_attribute("gen_ai.provider.name", "openai")
                span.set_attribute("gen_ai.usage.input_tokens", usage["prompt_tokens"] // 2)
                span.set_attribute("gen_ai.usage.output_tokens", usage["completion_tokens"])
            if style == "events":
                record_events(span, messages[:k], messages[k])
            elif style == "attributes":
                system, history = split_system(messages[:k])
                span.set_attribute("gen_ai.system_instructions", json.dumps(system))
                span.set_attribute("gen_ai.input.messages", json.dumps(to_parts(history)))
                span.set_attribute("gen_ai.output.messages", json.dumps(to_parts([messages[k]])))
            span.end(end_time=t0 + 500)
            for call in messages[k].get("tool_calls") or ():
                tool = tracer.start_span(
                    f"execute_tool {call['function']['name']}", context=ctx, start_time=t0 + 600
                )
                tool.set_attribute("gen_ai.operation.name", "execute_tool")
                tool.set_attribute("gen_ai.tool.name", call["function"]["name"])
                tool.set_attribute("gen_ai.tool.call.id", call["id"])
                result = next(m for m in messages if m.get("tool_call_id") == call["id"])
                tool.set_attribute("gen_ai.tool.call.result", result["content"])
                tool.end(end_time=t0 + 900)
        score = 1.0 if record["success"] else 0.0
        root.add_event(
            "gen_ai.evaluation.result",
            {"gen_ai.evaluation.name": "task_success", "gen_ai.evaluation.score.value": score},
        )
        root.end(end_time=end)
    request = encode_spans(exporter.get_finished_spans())
    return json_format.MessageToDict(request)


def split_system(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    system = [{"type": "text", "content": m["content"]} for m in messages if m["role"] == "system"]
    return system, [m for m in messages if m["role"] != "system"]


def to_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> GenAI semantic-convention messages (role + typed parts)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            response = m["content"]
            parts: list[dict[str, Any]] = [
                {"type": "tool_call_response", "id": m["tool_call_id"], "response": response}
            ]
        else:
            parts = [{"type": "text", "content": m["content"]}] if m.get("content") else []
            for call in m.get("tool_calls") or ():
                parts.append(
                    {
                        "type": "tool_call",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "arguments": loads_or_text(call["function"]["arguments"]),
                    }
                )
        out.append({"role": m["role"], "parts": parts})
    return out


def record_events(span: Any, history: list[dict[str, Any]], reply: dict[str, Any]) -> None:
    """The earlier conventions: one span event per input message, `gen_ai.choice` for the output."""
    for m in history:
        attrs: dict[str, Any] = {"content": m.get("content") or ""}
        if m.get("tool_calls"):
            attrs["tool_calls"] = json.dumps(m["tool_calls"])
        if m["role"] == "tool":
            attrs["id"] = m["tool_call_id"]
        span.add_event(f"gen_ai.{m['role']}.message", attrs)
    span.add_event("gen_ai.choice", {"index": 0, "message": json.dumps(reply)})


def record_indexed(span: Any, history: list[dict[str, Any]], reply: dict[str, Any]) -> None:
    """OpenLLMetry's flat attributes: `gen_ai.prompt.<i>.*` in, `gen_ai.completion.0.*` out."""
    prefixes = [f"gen_ai.prompt.{i}" for i in range(len(history))] + ["gen_ai.completion.0"]
    for prefix, m in zip(prefixes, [*history, reply], strict=True):
        span.set_attribute(f"{prefix}.role", m["role"])
        if m.get("content") is not None:
            span.set_attribute(f"{prefix}.content", m["content"])
        if m.get("tool_call_id"):
            span.set_attribute(f"{prefix}.tool_call_id", m["tool_call_id"])
        for j, call in enumerate(m.get("tool_calls") or ()):
            span.set_attribute(f"{prefix}.tool_calls.{j}.id", call["id"])
            span.set_attribute(f"{prefix}.tool_calls.{j}.name", call["function"]["name"])
            span.set_attribute(f"{prefix}.tool_calls.{j}.arguments", call["function"]["arguments"])


def hex_ids(document: dict[str, Any]) -> dict[str, Any]:
    """Trace and span ids as hex, as the OTLP/JSON spec writes them (protobuf's mapping: base64)."""
    import base64

    for resource in document["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return document


OTEL_MAPPING: dict[str, Any] = {
    "fields": {"task_id": "attributes.app.task_id", "family": "attributes.app.family"},
    "success_from_reward": "evaluations.task_success",
    "defaults": {"cost_usd": 0.0},
}


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return path
