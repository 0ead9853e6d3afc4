"""The chat template: Qwen2.5 layout, compact tools, and a loss mask that includes `<|im_end|>`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.base_model import encode_with_labels, render_corpus, train_tokenizer
from tracetune.agent.corpus import generate_corpus
from tracetune.agent.template import (
    GENERATION_PROMPT,
    IM_END,
    assistant_texts,
    ensure_chat_template,
    has_generation_markers,
    load_chat_template,
    normalize_messages,
    render_messages,
    render_with_spans,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_thing",
            "description": "Get a thing by id.",
            "parameters": {
                "type": "object",
                "properties": {"thing_id": {"type": "string"}},
                "required": ["thing_id"],
            },
        },
    }
]


def call(cid: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a test assistant."},
    {"role": "user", "content": "Status of things X-1 and X-2?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            call("c0", "get_thing", '{"thing_id":"X-1"}'),
            call("c1", "get_thing", {"thing_id": "X-2"}),
        ],
    },
    {"role": "tool", "tool_call_id": "c0", "content": '{"status": "open"}'},
    {"role": "tool", "tool_call_id": "c1", "content": '{"status": "closed"}'},
    {"role": "assistant", "content": "X-1 is open; X-2 is closed."},
]

EXPECTED = (
    "<|im_start|>system\nYou are a test assistant.\n\n# Tools\n\n"
    "Function signatures (name, description, parameters: type or allowed values) within "
    "<tools></tools> XML tags:\n<tools>\n"
    '{"name":"get_thing","description":"Get a thing by id.","parameters":{"thing_id":"string"}}'
    "\n</tools>\n\nCall a function within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nStatus of things X-1 and X-2?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<tool_call>\n{"name": "get_thing", "arguments": {"thing_id": "X-1"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_thing", "arguments": {"thing_id": "X-2"}}\n</tool_call>'
    "<|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"status": "open"}\n</tool_response>\n'
    '<tool_response>\n{"status": "closed"}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nX-1 is open; X-2 is closed.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real tokenizer trained like the embedded model's, reloaded the way stages load it."""
    from transformers import AutoTokenizer

    texts = [text for text, _ in render_corpus(generate_corpus(150, seed=3))]
    path = Path(tmp_path_factory.mktemp("tok"))
    train_tokenizer(texts, vocab_size=600).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_render_is_qwen_layout_with_compact_signatures(tokenizer: Any) -> None:
    assert render_messages(tokenizer, CONVERSATION, TOOLS) == EXPECTED


def test_argument_strings_and_dicts_render_the_same() -> None:
    as_dict = [{"role": "assistant", "tool_calls": [call("c", "f", {"a": 1, "b": "x"})]}]
    as_str = [{"role": "assistant", "tool_calls": [call("c", "f", '{"a":1,  "b":"x"}')]}]
    assert assistant_texts(as_dict) == assistant_texts(as_str)
    assert '"arguments": {"a": 1, "b": "x"}}' in assistant_texts(as_str)[0]


def test_broken_argument_string_is_rendered_as_a_string() -> None:
    broken = [{"role": "assistant", "tool_calls": [call("c", "f", '{"a": 1')]}]
    assert '"arguments": "{\\"a\\": 1"}' in assistant_texts(broken)[0]
    assert normalize_messages(broken) == broken  # left as logged: curation decides


def test_loss_mask_is_assistant_output_and_its_end_token(tokenizer: Any) -> None:
    out = tokenizer.apply_chat_template(
        normalize_messages(CONVERSATION),  # as render_messages does (canonical argument strings)
        tools=TOOLS,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    segments: list[list[int]] = []
    for i, (tid, m) in enumerate(zip(ids, mask, strict=True)):
        if m and (i == 0 or not mask[i - 1]):
            segments.append([])
        if m:
            segments[-1].append(tid)
    assert [tokenizer.decode(s) for s in segments] == assistant_texts(CONVERSATION, TOOLS)
    assert all(s[-1] == im_end for s in segments)  # the model learns to stop
    # every other <|im_end|> (system, user, tool turns) is outside the loss
    ends = [i for i, tid in enumerate(ids) if tid == im_end]
    assert [mask[i] for i in ends] == [0, 0, 1, 0, 1]
    # nothing of the prompt side is learned
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    for prompt_text in ("system", "Status of things", "tool_response", "closed\n"):
        assert prompt_text not in learned


def test_fast_label_path_matches_transformers_mask(tokenizer: Any) -> None:
    corpus = generate_corpus(20, seed=11)
    ours = encode_with_labels(tokenizer, render_corpus(corpus))
    for conv, (ids, labels) in zip(corpus, ours, strict=True):
        ref = tokenizer.apply_chat_template(
            normalize_messages(conv["messages"]),
            tools=conv["tools"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert ids == ref["input_ids"]
        assert [int(lab != -100) for lab in labels] == list(ref["assistant_masks"])


def test_generation_prompt_is_a_prefix_of_the_conversation(tokenizer: Any) -> None:
    """What a rollout prompts with is exactly what training saw before each assistant turn."""
    full_text = render_messages(tokenizer, CONVERSATION, TOOLS)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    for k, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        prompt = render_messages(tokenizer, CONVERSATION[:k], TOOLS, add_generation_prompt=True)
        assert prompt.endswith(GENERATION_PROMPT)
        assert full_text.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids


def test_tool_lines_are_compact_signatures() -> None:
    """Every schema fact the model needs survives the compaction: names, types, enums, optional."""
    tools = [
        *TOOLS,
        {
            "type": "function",
            "function": {
                "name": "set_mode",
                "description": "Set a mode.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "mode": {"type": "string", "enum": ["on", "off"]},
                        "note": {"type": "string"},
                    },
                    "required": ["mode"],
                    "additionalProperties": False,
                },
            },
        },
    ]
    text, _ = render_with_spans(CONVERSATION, tools)
    block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    lines = block.split("\n")
    assert [json.loads(line) for line in lines] == [
        {
            "name": "get_thing",
            "description": "Get a thing by id.",
            "parameters": {"thing_id": "string"},
        },
        {
            "name": "set_mode",
            "description": "Set a mode.",
            "parameters": {"mode": ["on", "off"], "note": "string"},
            "optional": ["note"],
        },
    ]
    assert all(", " not in line and '": ' not in line for line in lines)


def test_parameter_descriptions_and_array_item_types_survive() -> None:
    """Issue 18: the compact signature dropped parameter descriptions and array item types
    (`"ids": "array"`); a parameter whose schema says more is now written whole."""
    items = {"type": "array", "items": {"type": "string", "pattern": "^O-\\d+$"}}
    nested = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {
        "type": "function",
        "function": {
            "name": "tag_orders",
            "description": "Tag several orders.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_ids": items | {"description": "The orders to tag, e.g. O-1."},
                    "tag": {"type": "string", "enum": ["vip", "late"]},
                    "priority": {"type": "integer", "description": "1 (low) to 5 (high)."},
                    "address": nested,
                    "note": {"type": "string"},
                },
                "required": ["order_ids", "tag"],
            },
        },
    }
    text, _ = render_with_spans(CONVERSATION, [tool])
    line = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(line) == {
        "name": "tag_orders",
        "description": "Tag several orders.",
        "parameters": {
            "order_ids": items | {"description": "The orders to tag, e.g. O-1."},
            "tag": ["vip", "late"],
            "priority": {"type": "integer", "description": "1 (low) to 5 (high)."},
            "address": nested,
            "note": "string",
        },
        "optional": ["priority", "address", "note"],
    }


def test_no_tools_and_no_system_message_get_a_default_system_turn(tokenizer: Any) -> None:
    text = render_messages(
        tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_ensure_chat_template(tokenizer: Any) -> None:
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
        assert ensure_chat_template(tokenizer) is True
        assert tokenizer.chat_template == load_chat_template()
        assert ensure_chat_template(tokenizer) is False  # ours has markers: kept
        parsed = tokenizer.parse_response(
            '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>',
            prefix=GENERATION_PROMPT,
        )
        assert parsed["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    finally:
        tokenizer.chat_template = original
    assert has_generation_markers("{%- generation -%}x{% endgeneration %}")
    assert not has_generation_markers(None)


@pytest.mark.slow
def test_trl_accepts_the_template_without_patching(tokenizer: Any) -> None:
    """TRL's own checks: tool support, prefix preservation, stop token in the loss."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
        supports_tool_calling,
    )

    assert supports_tool_calling(tokenizer)
    assert is_chat_template_prefix_preserving(tokenizer)
    assert is_chat_template_stop_token_trained(tokenizer)
    assert get_training_chat_template(tokenizer) is None


def _ids_of(tokenizer: Any, text: str, value: str) -> list[int]:
    """The token ids that spell `value` where it stands inside `text`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(value)
    end = start + len(value)
    return [
        i
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if a >= start and b <= end and b > a
    ]


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tokenizer with the `isolated` split, reloaded the way stages load it."""
    from transformers import AutoTokenizer

    texts = [text for text, _ in render_corpus(generate_corpus(150, seed=3))]
    path = Path(tmp_path_factory.mktemp("tok-isolated"))
    train_tokenizer(texts, vocab_size=600, pretokenizer="isolated").save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize(
    "value", ["YM37920", "jun.novak358@example.com", "Classic Chair", "in_transit", "EUR"]
)
def test_isolated_pretokenizer_spells_a_value_the_same_in_prose_json_and_answers(
    isolated: Any, value: str
) -> None:
    """Copying is token identity only if a value is the same ids wherever it stands."""
    prose = f"Hi, what about {value}? Thanks"
    call = json.dumps({"key": value})
    answer = f"It is {value}."
    ids = [_ids_of(isolated, text, value) for text in (prose, call, answer)]
    assert isolated.decode(ids[0]) == value
    assert ids[0] == ids[1] == ids[2]


def test_qwen2_pretokenizer_spells_values_differently_by_context(tokenizer: Any) -> None:
    """What `isolated` is for: the default (Qwen2's) split glues the space before a word on."""
    for value in ("amount", "open", "closed"):
        prose = _ids_of(tokenizer, f"the {value} is", value)
        call = _ids_of(tokenizer, json.dumps({"k": value}), value)
        assert tokenizer.decode(call) == value
        assert prose != call, value
