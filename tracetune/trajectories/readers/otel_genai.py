"""OpenTelemetry GenAI spans exported as OTLP/JSON: one trace becomes one trajectory.

Input: the OTLP/JSON encoding of `ExportTraceServiceRequest` (`{"resourceSpans": [...]}`), one
document per file or one per line (the Collector's file exporter), ids as hex (the OTLP spec) or
base64 (protobuf's generic JSON mapping). Spans are grouped by trace id over the whole file, so a
file must hold complete traces (ingest rotated files, not the one being written).

A trajectory is read from the trace's chat spans (`gen_ai.operation.name` chat,
text_completion or generate_content): the conversation is the last chat span's input plus its
output (each model call sees the history so far), then the results of `execute_tool` spans
after it (`gen_ai.tool.call.id`, `gen_ai.tool.call.result`: a conversation that ends on a tool's
result), in either form of the semantic conventions:

- current: `gen_ai.system_instructions`, `gen_ai.input.messages`, `gen_ai.output.messages`
  (messages of typed parts: text, tool_call, tool_call_response), as span attributes or on a
  `gen_ai.client.inference.operation.details` event;
- earlier: one event per message (`gen_ai.system.message`, `gen_ai.user.message`,
  `gen_ai.assistant.message`, `gen_ai.tool.message`) and `gen_ai.choice` for the output;
- OpenLLMetry's flat attributes (`gen_ai.prompt.<i>.role` / `.content` / `.tool_calls.<j>.name`
  ..., `gen_ai.completion.<i>...`, `llm.request.type: chat`), token counts as
  `gen_ai.usage.prompt_tokens` / `completion_tokens`.

Usage sums `gen_ai.usage.input_tokens` / `output_tokens` over the chat spans; the model is the
last chat span's `gen_ai.response.model` (else `gen_ai.request.model`); timestamp and latency
come from the root span. For the mapping the reader exposes `attributes` (the root span's),
`resource` and `evaluations` (`gen_ai.evaluation.result` events: name -> score, else label),
e.g. `success_from_reward: evaluations.task_success`, `fields: {task_id: attributes.app.task_id}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

from tracetune.config import FieldMapping
from tracetune.trajectories import quarantine as q
from tracetune.trajectories.mapping import apply_mapping
from tracetune.trajectories.readers.base import Reader, ReadError, describe
from tracetune.trajectories.readers.openai_chat import append_tool_results, normalise_messages

CHAT_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
EVALUATION_EVENT = "gen_ai.evaluation.result"
NO_CHAT = "otel_genai:no_chat_span"
MESSAGES = "otel_genai:messages"
INDEXED_PROMPT = "gen_ai.prompt.0.role"
INDEXED = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")
TOOL_CALL_FIELD = re.compile(r"^tool_calls\.(\d+)\.(id|name|arguments)$")
# (input, output) token attributes: the current names, then the earlier ones
USAGE_NAMES = (
    ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"),
    ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens"),
)
EVENT_ROLES = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}


class OtelGenAIReader(Reader):
    name: ClassVar[str] = "otel_genai"
    context_keys: ClassVar[tuple[str, ...]] = ("attributes", "resource", "evaluations")
    whole_object: ClassVar[bool] = True

    def recognises(self, value: Any) -> bool:
        return isinstance(value, dict) and isinstance(value.get("resourceSpans"), list)

    def items(self, document: Any) -> Iterator[Any]:
        """Traces (spans grouped by trace id, in first-seen order) of one or more requests."""
        requests = document if isinstance(document, list) else [document]
        traces: dict[str, dict[str, Any]] = {}
        for request in requests:
            if not self.recognises(request):
                raise ReadError("unrecognised_format", f"{describe(request)}: not OTLP/JSON")
            for resource_spans in request["resourceSpans"]:
                resource = attributes((resource_spans.get("resource") or {}).get("attributes"))
                for scope in resource_spans.get("scopeSpans") or ():
                    for span in scope.get("spans") or ():
                        trace_id = hex_id(span.get("traceId"))
                        trace = traces.setdefault(
                            trace_id, {"trace_id": trace_id, "resource": resource, "spans": []}
                        )
                        trace["spans"].append(span)
        yield from traces.values()

    def to_record(self, item: Any, mapping: FieldMapping) -> dict[str, Any]:
        if not isinstance(item, dict) or not isinstance(item.get("spans"), list):
            raise ReadError(q.NOT_AN_OBJECT, f"{describe(item)}: not a trace")
        spans = sorted((_span(s) for s in item["spans"]), key=lambda s: s["start"])
        ids = {s["id"] for s in spans}
        root = next((s for s in spans if s["parent"] not in ids), spans[0])
        chats = [s for s in spans if is_chat(s["attributes"])]
        if not chats:
            raise ReadError(NO_CHAT, "no span with gen_ai.operation.name chat in this trace")
        last = chats[-1]
        record: dict[str, Any] = {
            "trajectory_id": item["trace_id"],
            "timestamp": datetime.fromtimestamp(root["start"] / 1e9, UTC).isoformat(),
            "latency_s": max(0.0, (root["end"] - root["start"]) / 1e9),
            "messages": append_tool_results(conversation(last), tool_results(spans, last)),
            "attributes": root["attributes"],
            "resource": item.get("resource") or {},
            "evaluations": evaluations(spans),
        }
        model = last["attributes"].get("gen_ai.response.model") or last["attributes"].get(
            "gen_ai.request.model"
        )
        if model:
            record["model"] = model
        usage = token_usage(chats)
        if usage:
            record["usage"] = usage
        record = apply_mapping(record, mapping)
        record["messages"] = normalise_messages(record["messages"])
        return self.finish(record)


def _span(span: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": span.get("spanId"),
        "parent": span.get("parentSpanId") or None,
        "start": int(span.get("startTimeUnixNano") or 0),
        "end": int(span.get("endTimeUnixNano") or 0),
        "attributes": attributes(span.get("attributes")),
        "events": [
            {"name": e.get("name"), "attributes": attributes(e.get("attributes"))}
            for e in span.get("events") or ()
        ],
    }


def hex_id(value: Any) -> str:
    """A trace id as the 32 hex digits every tool shows, whichever JSON encoding carried it."""
    text = str(value or "")
    try:
        int(text, 16)
    except ValueError:
        try:
            return base64.b64decode(text, validate=True).hex()
        except (binascii.Error, ValueError):
            return text
    return text.lower()


def any_value(value: Any) -> Any:
    """An OTLP `AnyValue` as a Python value (intValue arrives as a string in JSON)."""
    if not isinstance(value, dict):
        return value
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [any_value(v) for v in (value["arrayValue"] or {}).get("values") or ()]
    if "kvlistValue" in value:
        return attributes((value["kvlistValue"] or {}).get("values"))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def attributes(pairs: Any) -> dict[str, Any]:
    return {p["key"]: any_value(p.get("value")) for p in pairs or () if isinstance(p, dict)}


def _json(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ReadError(MESSAGES, f"{name} is not JSON: {exc}") from exc
    return value


def conversation(chat: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat span's input and output messages, as OpenAI chat messages."""
    sources = [chat["attributes"]] + [
        e["attributes"] for e in chat["events"] if e["name"] == DETAILS_EVENT
    ]
    if INDEXED_PROMPT in chat["attributes"]:
        return from_indexed(chat["attributes"])
    for attrs in sources:
        if "gen_ai.input.messages" in attrs or "gen_ai.output.messages" in attrs:
            messages: list[dict[str, Any]] = []
            for part in _json(attrs.get("gen_ai.system_instructions"), "system_instructions") or []:
                if isinstance(part, dict) and part.get("type") == "text":
                    messages.append({"role": "system", "content": part.get("content")})
            for name in ("gen_ai.input.messages", "gen_ai.output.messages"):
                for message in _json(attrs.get(name), name) or []:
                    messages.extend(from_parts(message))
            return messages
    return from_events(chat["events"])


def is_chat(attrs: dict[str, Any]) -> bool:
    return (
        attrs.get("gen_ai.operation.name") in CHAT_OPERATIONS
        or attrs.get("llm.request.type") == "chat"
        or INDEXED_PROMPT in attrs
    )


def from_indexed(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenLLMetry's flat form: `gen_ai.prompt.<i>.role` / `.content` / `.tool_call_id` /
    `.tool_calls.<j>.{id,name,arguments}`, the same under `gen_ai.completion.<i>` (output)."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for key, value in attrs.items():
        match = INDEXED.match(key)
        if not match:
            continue
        side, index, field = match.group(1), int(match.group(2)), match.group(3)
        message = found.setdefault((side == "completion", index), {})
        call = TOOL_CALL_FIELD.match(field)
        if call:
            calls = message.setdefault("_calls", {})
            calls.setdefault(int(call.group(1)), {})[call.group(2)] = value
        elif field in ("role", "content", "tool_call_id", "name"):
            message[field] = value
    messages = []
    for _, message in sorted(found.items()):
        calls = message.pop("_calls", {})
        if isinstance(message.get("content"), str) and message["content"][:1] == "[":
            parts = _json_or_text(message["content"])  # content parts, logged as JSON text
            if isinstance(parts, list) and all(isinstance(p, dict) and "type" in p for p in parts):
                message["content"] = parts
        if calls:
            message["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": c.get("name"), "arguments": c.get("arguments") or "{}"},
                }
                for _, c in sorted(calls.items())
            ]
        message.setdefault("role", "assistant")
        messages.append(message)
    return messages


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def from_parts(message: Any) -> list[dict[str, Any]]:
    """One semantic-conventions message (role + typed parts) -> OpenAI chat messages."""
    if not isinstance(message, dict):
        raise ReadError(MESSAGES, f"a message that is not an object: {describe(message)}")
    role = message.get("role")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for part in message.get("parts") or ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("content", "")))
        elif kind == "tool_call":
            arguments = part.get("arguments")
            calls.append(
                {
                    "id": part.get("id"),
                    "type": "function",
                    "function": {
                        "name": part.get("name"),
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments if arguments is not None else {}),
                    },
                }
            )
        elif kind == "tool_call_response":
            response = part.get("response")
            content = response if isinstance(response, str) else json.dumps(response)
            results.append({"role": "tool", "tool_call_id": part.get("id"), "content": content})
        elif kind == "reasoning":
            continue  # the model's hidden reasoning is not part of the conversation we train on
        else:
            raise ReadError(MESSAGES, f"a message part that is not text or a tool call: {kind!r}")
    if results:
        return results
    out: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    if message.get("name"):
        out["name"] = message["name"]
    return [out]


def from_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages of the earlier event form: one event per input message, `gen_ai.choice` out."""
    messages: list[dict[str, Any]] = []
    for event in events:
        attrs = event["attributes"]
        if event["name"] in EVENT_ROLES:
            message: dict[str, Any] = {"role": EVENT_ROLES[event["name"]]}
            message["content"] = attrs.get("content")
            if attrs.get("tool_calls"):
                message["tool_calls"] = _json(attrs["tool_calls"], "tool_calls")
            if message["role"] == "tool":
                message["tool_call_id"] = attrs.get("id")
            messages.append(message)
        elif event["name"] == "gen_ai.choice":
            choice = _json(attrs.get("message"), "gen_ai.choice message") or {}
            if isinstance(choice, dict):
                message = {"role": choice.get("role") or "assistant"}
                message["content"] = choice.get("content")
                if choice.get("tool_calls"):
                    message["tool_calls"] = _json(choice["tool_calls"], "tool_calls")
                messages.append(message)
    if not messages:
        raise ReadError(MESSAGES, "the chat span records no messages (content capture off?)")
    return messages


def tool_results(
    spans: list[dict[str, Any]], last: dict[str, Any]
) -> list[tuple[str | None, str | None, Any]]:
    """`execute_tool` spans after the last model call, with the result they recorded."""
    return [
        (a.get("gen_ai.tool.call.id"), a.get("gen_ai.tool.name"), a["gen_ai.tool.call.result"])
        for s in spans
        if s["start"] >= last["start"]
        and (a := s["attributes"]).get("gen_ai.operation.name") == "execute_tool"
        and "gen_ai.tool.call.result" in a
    ]


def token_usage(chats: list[dict[str, Any]]) -> dict[str, int] | None:
    prompt = completion = 0
    found = False
    for span in chats:
        attrs = span["attributes"]
        for inputs, outputs in USAGE_NAMES:
            if inputs in attrs or outputs in attrs:
                found = True
                prompt += int(attrs.get(inputs) or 0)
                completion += int(attrs.get(outputs) or 0)
                break
    return {"prompt_tokens": prompt, "completion_tokens": completion} if found else None


def evaluations(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """`gen_ai.evaluation.result` events: evaluation name -> score (or label when no score)."""
    found: dict[str, Any] = {}
    for span in spans:
        for event in span["events"]:
            attrs = event["attributes"]
            if event["name"] == EVALUATION_EVENT and attrs.get("gen_ai.evaluation.name"):
                score = attrs.get("gen_ai.evaluation.score.value")
                label = attrs.get("gen_ai.evaluation.score.label")
                found[attrs["gen_ai.evaluation.name"]] = score if score is not None else label
    return found
