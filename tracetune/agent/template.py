"""Our chat template (Qwen2.5/Hermes tool format with `{% generation %}` markers) and helpers.

Why a template of our own: TRL's `assistant_only_loss=True` needs `{% generation %}` markers, and
most hub templates have none (STACK.md: TRL only swaps in a training variant for templates it
recognises by exact string). Ours keeps the Qwen2.5 layout and tool-call format, puts
each assistant turn's `<|im_end|>` inside the generation block (the model must learn to stop),
and writes each tool as a compact one-line JSON signature (name, description, parameter
types or allowed values) to keep the CPU token budget small.

Logged tool-call arguments are JSON *strings* (OpenAI format). The template writes a string
that looks like a JSON object as-is, so `normalize_messages` first rewrites each valid one in the
canonical form the parser emits (`parsing.dump_arguments`): training text, prompts and parsed
calls then agree byte for byte. Arguments stay strings, so `datasets` cannot merge the argument
dicts of different tools into one struct (STACK.md).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from tracetune.agent.parsing import dump_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_FILE = "chat_template.jinja"
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>",
             "</tools>")  # fmt: skip
GENERATION_PROMPT = f"{IM_START}assistant\n"
IGNORE = -100  # the label of a token outside the assistant's output: no loss (torch/HF)
# transformers' response-parsing spec for our assistant format (`tokenizer.parse_response`). TRL's
# GRPO needs it to run tool calls, and only knows it for templates it recognises by exact string.
RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": GENERATION_PROMPT,
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


@lru_cache(maxsize=1)
def load_chat_template() -> str:
    """The packaged Jinja chat template."""
    return resources.files("tracetune.agent").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant output for assistant-only loss."""
    return bool(template) and _GENERATION_RE.search(template or "") is not None


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Attach our template when the tokenizer's has no `{% generation %}` markers.

    Returns True when it replaced the template. Hub templates with markers are kept: their
    authors know their model's format best. With our template comes our response-parsing spec
    (`tokenizer.parse_response`), unless the tokenizer already has one for the same format.
    """
    current = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if has_generation_markers(current):
        return False
    tokenizer.chat_template = load_chat_template()
    tokenizer.response_template = RESPONSE_TEMPLATE
    return True


def canonical_arguments(arguments: Any) -> Any:
    """A JSON-object string in canonical form; anything else (broken JSON, dicts) unchanged."""
    if not isinstance(arguments, str):
        return arguments
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
    return dump_arguments(value) if isinstance(value, dict) else arguments


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of `messages` with canonical argument strings (see the module docstring)."""
    out = []
    for message in messages:
        msg = dict(message)
        if msg.get("tool_calls"):
            calls = copy.deepcopy(msg["tool_calls"])
            for call in calls:
                fn = call.get("function", call)
                if isinstance(fn, dict) and "arguments" in fn:
                    fn["arguments"] = canonical_arguments(fn["arguments"])
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def render_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The prompt/training text of a conversation with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=list(tools) if tools else None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


def render_with_spans(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of assistant output (the loss region).

    Needs no tokenizer, so a corpus can be rendered before its tokenizer exists.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    # Annotated `-> str` upstream, but returns (texts, generation spans) with the mask flag.
    result: Any = render_jinja_template(
        conversations=[normalize_messages(messages)],
        tools=list(tools) if tools else None,
        chat_template=template or load_chat_template(),
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
    )
    rendered, spans = result
    return str(rendered[0]), [(int(a), int(b)) for a, b in spans[0]]


def assistant_texts(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
) -> list[str]:
    """What the model must generate for each assistant turn (its `<|im_end|>` included)."""
    text, spans = render_with_spans(messages, tools)
    return [text[a:b] for a, b in spans]
