"""OpenAI chat conversations, as other harnesses log them.

A record is `{"messages": [...], ...metadata}` or a bare list of messages, one per JSONL line,
in a JSON array, or in the one list an object holds (`{"runs": [...]}`). Messages are brought to
the shape our schema keeps (the Chat Completions format):

- `content` as a list of parts (`[{"type": "text", "text": ...}]`, also `input_text`,
  `output_text`, `refusal`) becomes the parts' text joined by newlines; a tool result logged as
  a JSON object or array becomes its JSON text; a part that is not text
  (an image, audio, a file) quarantines the record (`openai_chat:content_part`): there is no text
  to train on and dropping it would change what the model saw;
- tool-call `arguments` logged as objects become JSON strings; a call without `type` is a
  `function` call;
- the legacy `function_call` / `role: function` pair becomes a tool call and its tool message
  (ids `fc_<n>`, paired in order);
- `role: developer` (the newer name of the system turn) becomes `system`; keys logged as `null`
  and empty `annotations` are dropped.

Request fields that are not part of the episode (`tools`, `functions`, `tool_choice`,
`parallel_tool_calls`) are dropped. Steps are derived (assistant turns) when not logged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from tracetune.config import FieldMapping
from tracetune.trajectories import quarantine as q
from tracetune.trajectories.mapping import apply_mapping
from tracetune.trajectories.readers.base import Reader, ReadError

REQUEST_FIELDS = ("tools", "functions", "tool_choice", "parallel_tool_calls")
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
CONTENT_PART = "openai_chat:content_part"
FUNCTION_CALL = "openai_chat:function_call"


class OpenAIChatReader(Reader):
    name: ClassVar[str] = "openai_chat"

    def recognises(self, value: Any) -> bool:
        if isinstance(value, dict):
            messages = value.get("messages")
            return isinstance(messages, list) and bool(messages) and _is_message(messages[0])
        return isinstance(value, list) and bool(value) and _is_message(value[0])

    def items(self, document: Any) -> Any:
        # A bare conversation (a list of messages) is one item, not a list of items.
        if isinstance(document, list) and document and _is_message(document[0]):
            return iter([document])
        return super().items(document)

    def to_record(self, item: Any, mapping: FieldMapping) -> dict[str, Any]:
        if isinstance(item, list):
            item = {"messages": item}
        if not isinstance(item, dict):
            raise ReadError(q.NOT_AN_OBJECT, f"a JSON {type(item).__name__}, not a conversation")
        for key in REQUEST_FIELDS:
            item.pop(key, None)
        record = apply_mapping(item, mapping)
        messages = record.get("messages")
        if isinstance(messages, list):
            record["messages"] = normalise_messages(messages)
        return self.finish(record)


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str)


def normalise_messages(messages: list[Any]) -> list[Any]:
    """OpenAI chat messages in any of their logged shapes -> the shape our schema keeps."""
    out: list[Any] = []
    pending: list[str] = []  # ids of legacy function calls not yet answered, in order
    calls = 0
    for message in messages:
        if not isinstance(message, dict):
            out.append(message)  # the schema names what is wrong with it
            continue
        message = {k: v for k, v in message.items() if v is not None}
        if message.get("annotations") == []:
            del message["annotations"]
        role = message.get("role")
        if role == "developer":
            message["role"] = "system"
        if "content" in message:
            message["content"] = content_text(message["content"], role)
        if "function_call" in message:
            calls += 1
            call_id = f"fc_{calls}"
            call = message.pop("function_call")
            if not isinstance(call, dict):
                raise ReadError(FUNCTION_CALL, f"function_call is not an object: {call!r}")
            message.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": _function(call)}
            )
            pending.append(call_id)
        if role == "function":
            if not pending:
                raise ReadError(FUNCTION_CALL, "a function result without a function_call")
            message["role"] = "tool"
            message["tool_call_id"] = pending.pop(0)
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_tool_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def content_text(content: Any, role: Any = None) -> Any:
    """A content-parts list as text; a tool's structured result as its JSON text; other shapes
    pass through for the schema to judge."""
    if role in ("tool", "function") and isinstance(content, dict | list) and not _parts(content):
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        field = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if field is None or not isinstance(part.get(field), str):
            raise ReadError(CONTENT_PART, f"a content part that is not text: type {kind!r}")
        texts.append(part[field])
    return "\n".join(texts)


def _parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("type"), str))
        for p in content
    )


def _function(call: dict[str, Any]) -> dict[str, Any]:
    function = {k: v for k, v in call.items() if v is not None}
    arguments = function.setdefault("arguments", "{}")  # a call without arguments takes none
    if isinstance(arguments, dict | list):
        function["arguments"] = json.dumps(arguments, ensure_ascii=False)
    return function


def _tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    call = {k: v for k, v in call.items() if v is not None}
    call.setdefault("type", "function")
    if isinstance(call.get("function"), dict):
        call["function"] = _function(call["function"])
    return call


def append_tool_results(
    messages: list[Any], results: list[tuple[str | None, str | None, Any]]
) -> list[Any]:
    """Tool results logged after the last model call answer that turn's calls.

    A conversation may end on a tool's result (a hand-off): no model call saw it, so only the
    tool's own span has it. Each (call id, tool name, result) answers the pending call with that
    id, else the first pending call of that tool; results that answer nothing are left out.
    """
    last = messages[-1] if messages else None
    if not (isinstance(last, dict) and last.get("role") == "assistant" and last.get("tool_calls")):
        return messages
    pending = [c for c in last["tool_calls"] if isinstance(c, dict) and c.get("id")]
    out = list(messages)
    for call_id, name, result in results:
        call = next((c for c in pending if call_id and c["id"] == call_id), None) or next(
            (c for c in pending if not call_id and (c.get("function") or {}).get("name") == name),
            None,
        )
        if call is None:
            continue
        pending.remove(call)
        content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        out.append({"role": "tool", "tool_call_id": call["id"], "content": content})
    return out
