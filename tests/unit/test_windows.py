"""The pure parts of cutting long conversations into windows (tracetune/training/windows.py);
the windows themselves are tested on a real tokenizer in tests/integration/test_sft.py."""

from __future__ import annotations

from types import SimpleNamespace

from tracetune.training.windows import (
    assistant_indices,
    mask_runs,
    minimal_start,
    untrain_first_turns,
    valid_starts,
)
from tracetune.trajectories.schema import message_text

CALL = {"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": "{}"}}
BODY = [
    {"role": "user", "content": "q1"},  # 0
    {"role": "assistant", "content": None, "tool_calls": [CALL]},  # 1
    {"role": "tool", "tool_call_id": "c1", "content": "{}"},  # 2
    {"role": "tool", "tool_call_id": "c1", "content": "{}"},  # 3
    {"role": "assistant", "content": "a1"},  # 4
    {"role": "assistant", "content": "a1, again"},  # 5
    {"role": "user", "content": "q2"},  # 6
    {"role": "assistant", "content": "a2"},  # 7
]


def test_a_turn_keeps_what_it_answers() -> None:
    assert assistant_indices(BODY) == [1, 4, 5, 7]
    assert minimal_start(BODY, 1) == 0  # the user's question
    assert minimal_start(BODY, 4) == 1  # its tool call, with both results
    assert minimal_start(BODY, 5) == 5  # after another assistant turn: nothing to keep
    assert minimal_start(BODY, 7) == 6
    assert valid_starts(BODY, 6) == [0, 1, 4, 5, 6]  # never a tool result without its call


def test_context_turns_are_masked_out_of_the_loss() -> None:
    mask = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1]
    assert mask_runs(mask) == [(1, 3), (5, 6), (7, 10)]
    example = SimpleNamespace(assistant_masks=list(mask))
    untrain_first_turns(example, 2)
    assert example.assistant_masks == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_message_text_covers_calls_and_content_parts() -> None:
    assert message_text(BODY[1]) == "get_order\n{}"
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert message_text(parts) == "ab"
