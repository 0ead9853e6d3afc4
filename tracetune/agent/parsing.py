"""Tool calls out of raw model text, without ever raising or evaluating anything.

The model writes Hermes/Qwen2.5-style calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`. A small model often writes them wrong, and a wrong call is a *step the agent must
see and recover from*, not a crash of the rollout: so the parser returns a `ParsedTurn` whose
`error` says what went wrong, and the rollout engine turns that into a failed step. The only
decoder used is `json.loads` (no `eval`, no `ast.literal_eval`).

Contract of `ParsedTurn`:

- `error is None` and no `tool_calls`: a final answer (`content` holds it).
- `error is None` with `tool_calls`: execute them in order (`content` is any text around them).
- `error` set: the turn as a whole is invalid; `tool_calls` is empty and `content` holds the
  raw text, so that the conversation keeps what the model really wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
# End-of-turn markers a decode may keep (skip_special_tokens=False); never part of the answer.
END_MARKERS = ("<|im_end|>", "<|endoftext|>")

_TAG = re.compile(re.escape(TOOL_CALL_OPEN) + "|" + re.escape(TOOL_CALL_CLOSE))

# Error kinds, stable prefixes so metrics can count them.
ERR_UNTERMINATED = "unterminated <tool_call>"
ERR_UNEXPECTED_CLOSE = "</tool_call> without <tool_call>"
ERR_NESTED = "nested <tool_call>"
ERR_JSON = "malformed tool_call JSON"
ERR_NOT_OBJECT = "tool_call is not a JSON object"
ERR_NAME = "tool_call missing name"
ERR_ARGUMENTS = "tool_call arguments are not a JSON object"


@dataclass(frozen=True)
class ParsedCall:
    """One call. `arguments` is a JSON object *string*, as in OpenAI's format."""

    name: str
    arguments: str
    id: str


@dataclass(frozen=True)
class ParsedTurn:
    """What one assistant generation amounts to (see the module docstring for the contract)."""

    content: str | None
    tool_calls: list[ParsedCall] = field(default_factory=list)
    error: str | None = None
    raw: str = ""

    @property
    def is_final(self) -> bool:
        """A valid turn that calls no tool: the episode's final answer."""
        return self.error is None and not self.tool_calls


def strip_end_markers(text: str) -> str:
    """Drop a trailing `<|im_end|>` / `<|endoftext|>` (and anything after it)."""
    cut = len(text)
    for marker in END_MARKERS:
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def parse_assistant_output(text: str, id_prefix: str = "call") -> ParsedTurn:
    """Parse one assistant generation; never raises. Call ids are `{id_prefix}_{i}`.

    Pass a per-turn `id_prefix` (e.g. `call_3`) so ids stay unique within an episode.
    """
    raw = strip_end_markers(text if isinstance(text, str) else str(text))
    blocks, outside, error = _split_blocks(raw)
    if error is None:
        calls: list[ParsedCall] = []
        for i, block in enumerate(blocks):
            call = _parse_call(block, f"{id_prefix}_{i}")
            if isinstance(call, str):
                error = call
                break
            calls.append(call)
        if error is None:
            content = "\n".join(part.strip() for part in outside if part.strip()) or None
            return ParsedTurn(content=content, tool_calls=calls, raw=raw)
    return ParsedTurn(content=raw.strip() or None, tool_calls=[], error=error, raw=raw)


def _split_blocks(text: str) -> tuple[list[str], list[str], str | None]:
    """The inner texts of `<tool_call>` blocks and the text outside them, or an error."""
    blocks: list[str] = []
    outside: list[str] = []
    pos = 0
    open_at: int | None = None
    for match in _TAG.finditer(text):
        tag = match.group(0)
        if tag == TOOL_CALL_OPEN:
            if open_at is not None:
                return [], [], ERR_NESTED
            outside.append(text[pos : match.start()])
            open_at = match.end()
        else:
            if open_at is None:
                return [], [], ERR_UNEXPECTED_CLOSE
            blocks.append(text[open_at : match.start()])
            open_at = None
        pos = match.end()
    if open_at is not None:
        return [], [], ERR_UNTERMINATED
    outside.append(text[pos:])
    return blocks, outside, None


def _reject_constant(name: str) -> Any:
    """NaN / Infinity are not JSON; `json.loads` would accept them by default."""
    raise ValueError(f"non-standard JSON constant {name}")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _parse_call(block: str, call_id: str) -> ParsedCall | str:
    """One `<tool_call>` body as a call, or the error message."""
    try:
        payload = _loads(block.strip())
    except (ValueError, RecursionError) as exc:
        return f"{ERR_JSON}: {_short(exc)}"
    if not isinstance(payload, dict):
        return ERR_NOT_OBJECT
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        return ERR_NAME
    args = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = _loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return ERR_ARGUMENTS
    if not isinstance(args, dict):
        return ERR_ARGUMENTS
    return ParsedCall(name=name.strip(), arguments=dump_arguments(args), id=call_id)


def _short(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:120]


def dump_arguments(args: dict[str, Any]) -> str:
    """The canonical JSON string of an arguments object (what the chat template renders)."""
    return json.dumps(args, ensure_ascii=False)


def to_openai_message(parsed: ParsedTurn) -> dict[str, Any]:
    """The OpenAI-format assistant message for a parsed turn (for logs and the next prompt)."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in parsed.tool_calls
        ]
    return message
