"""The trajectory schema: production logs, simulated logs and model rollouts all use it.

Messages stay in the OpenAI chat format (the lingua franca of agent logs) so that any logged
trajectory can be rendered by a chat template and trained on without conversion. Metadata that
the curation and evaluation stages need sits beside the messages, never inside them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(BaseModel):
    """A function call as OpenAI logs it: `arguments` is a JSON *string* (it may be malformed)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _role_fields(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class Usage(BaseModel):
    """Token usage as logged; `estimated: true` when the log had none and tracetune counted it
    (`tracetune.trajectories.usage`): gates never judge estimated numbers."""

    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    estimated: bool | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Trajectory(BaseModel):
    """One agent episode plus the outcome metadata production logs carry."""

    model_config = ConfigDict(extra="forbid")
    trajectory_id: str
    task_id: str
    family: str
    timestamp: datetime
    model: str
    messages: list[Message] = Field(min_length=2)
    success: bool
    steps: int = Field(ge=0)
    error_retries: int = Field(ge=0, default=0)
    usage: Usage
    cost_usd: float = Field(ge=0)
    cost_estimated: bool | None = None  # true: priced by ingest.usage.pricing, not logged
    latency_s: float = Field(ge=0)
    environment: str = "support_desk"
    final_answer: str | None = None
    failure: str | None = None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp must carry a timezone")
        return value

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False)


def count_steps(messages: list[Message] | list[dict[str, Any]]) -> int:
    """Steps = assistant turns: each tool-calling turn and the final answer count once."""
    return sum(1 for m in messages if _role(m) == "assistant")


def final_answer(messages: Sequence[Message] | Sequence[dict[str, Any]]) -> str | None:
    """The text of the last assistant message that has any: a conversation may go on after the
    answer (the user's goodbye, a hand-off tool's result), so it is not always the last one."""
    items: list[Message | dict[str, Any]] = list(messages)
    for message in reversed(items):
        if _role(message) != "assistant":
            continue
        content = message.content if isinstance(message, Message) else message.get("content")
        if isinstance(content, str) and content.strip():
            return content
    return None


def message_text(message: dict[str, Any]) -> str:
    """What of a message a chat template writes out, as plain text: its content (a string or
    text parts) and each tool call's name and arguments. What token estimates count."""
    parts = [_content_text(message.get("content"))]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [str(function.get("name") or ""), _content_text(function.get("arguments"))]
    return "\n".join(p for p in parts if p)


def _content_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts
        return "".join(str(p.get("text") or "") for p in value if isinstance(p, dict))
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def _role(message: Message | dict[str, Any]) -> str:
    return message.role if isinstance(message, Message) else str(message.get("role"))
