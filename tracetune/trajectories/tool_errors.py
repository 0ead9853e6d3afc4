"""One predicate for "this tool result is an error", whatever shape the harness logged it in.

Harnesses report a failed tool call in different shapes: a JSON object with an `error` key (our
environments, TRL's tool loop), an MCP-style `{"isError": true, ...}`, or plain text such as
`Error: order not found` or a Python traceback. Curation's error-retry rule, the raw gate's
error column and the evaluation reports all ask the same question, so they all ask this rule:
a result that one of them calls an error, every one of them calls an error.

The rule is data (picklable, so curation's worker processes get it as it is): JSON keys whose
truthy value marks an error, and regexes for text results, from `tool_errors` in params.yaml,
plus whatever the environment declares (`Environment.tool_error_keys` / `tool_error_patterns`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from tracetune.config import ToolErrorParams
    from tracetune.environments.base import Environment

DEFAULT_KEYS = ("error", "isError", "is_error")
# Text that starts with `Error` (the word, any case after it) or `error:`; a Python traceback.
DEFAULT_PATTERNS = (r"^\s*Error\b", r"^\s*error\s*:", r"^\s*Traceback \(most recent call last\)")


@dataclass(frozen=True)
class ToolErrorRule:
    """Is a tool message's content an error? (JSON keys with a truthy value, or a text match.)"""

    json_keys: tuple[str, ...] = DEFAULT_KEYS
    text_patterns: tuple[str, ...] = DEFAULT_PATTERNS

    @cached_property
    def _regex(self) -> re.Pattern[str] | None:
        if not self.text_patterns:
            return None
        return re.compile("|".join(f"(?:{p})" for p in self.text_patterns))

    def matches(self, content: Any) -> bool:
        """True when `content` (a tool message's content) reports a failed call.

        Verdicts on short texts are cached (bounded): curation asks twice per tool message (its
        retry rule and its error count), and tool results repeat across trajectories.
        """
        text = _text(content)
        if text is None:
            return False
        if len(text) > _VERDICT_MAX_CHARS:
            return self._matches(text)
        verdicts = self._verdicts
        verdict = verdicts.get(text)
        if verdict is None:
            verdict = self._matches(text)
            if len(verdicts) >= _VERDICTS_LIMIT:
                verdicts.clear()
            verdicts[text] = verdict
        return verdict

    @cached_property
    def _verdicts(self) -> dict[str, bool]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        """Without the verdict cache: the rule travels to curation's workers with every chunk."""
        return {k: v for k, v in self.__dict__.items() if k != "_verdicts"}

    def _matches(self, text: str) -> bool:
        regex = self._regex
        if "\\" not in text and not self._names_a_key(text):
            # Without escapes, a key of the decoded object is in the text as it is: none of
            # `json_keys` is, so a JSON object here is no error, and other text is one only
            # when a pattern matches (parsing every tool result was most of this rule's time).
            if regex is None or regex.search(text) is None:
                return False
            return _json_object(text) is None
        payload = _json_object(text)
        if payload is not None:
            return any(_truthy(payload.get(key)) for key in self.json_keys)
        return regex is not None and regex.search(text) is not None

    def _names_a_key(self, text: str) -> bool:
        """One of `json_keys` in quotes somewhere in `text`."""
        return any(f'"{key}"' in text for key in self.json_keys)

    def message(self, content: Any) -> str | None:
        """The error's text (the JSON key's value, or the text itself); None when no error."""
        if not self.matches(content):
            return None
        text = _text(content) or ""
        payload = _json_object(text)
        if payload is None:
            return text.strip()
        value = next(payload[k] for k in self.json_keys if _truthy(payload.get(k)))
        if isinstance(value, dict):  # {"error": {"message": ...}}, the OpenAI API's shape
            value = value.get("message", value)
        return text.strip() if value is True else str(value)

    def count(self, messages: Sequence[dict[str, Any]]) -> int:
        """Tool messages in `messages` that report an error."""
        return sum(
            1 for m in messages if m.get("role") == "tool" and self.matches(m.get("content"))
        )


def build_rule(
    params: ToolErrorParams | None = None, environment: Environment | None = None
) -> ToolErrorRule:
    """The rule from params.yaml's `tool_errors`, with what the environment declares added."""
    keys: list[str] = list(params.json_keys) if params else list(DEFAULT_KEYS)
    patterns: list[str] = list(params.text_patterns) if params else list(DEFAULT_PATTERNS)
    if environment is not None and (params is None or params.from_environment):
        keys += [k for k in environment.tool_error_keys if k not in keys]
        patterns += [p for p in environment.tool_error_patterns if p not in patterns]
    return ToolErrorRule(tuple(keys), tuple(patterns))


DEFAULT_RULE = ToolErrorRule()
# Verdicts a rule keeps (see `ToolErrorRule.matches`); its cache is cleared when full.
_VERDICTS_LIMIT = 20_000
_VERDICT_MAX_CHARS = 4_096


def _text(content: Any) -> str | None:
    """A tool message's content as text (a list of content parts is joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    if isinstance(content, dict):
        return orjson.dumps(content).decode()
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _truthy(value: Any) -> bool:
    """`{"error": null}` / `false` / `""` / `[]` is a success that names its error field."""
    return value not in (None, False, "", [], {}, 0)
