"""Re-keyed identifiers: consistent within a trajectory, fresh per pass, nothing else touched."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracetune.training.rekey import compile_patterns, redraw_digits, rekey_messages, rekeyed_passes

IDS = compile_patterns([r"\b[OC]-\d+\b"])


def _trajectory(order: str = "O-10664", customer: str = "C-0273") -> list[dict[str, Any]]:
    result = {"order_id": order, "customer_id": customer, "status": "shipped", "total_usd": 40.34}
    return [
        {"role": "system", "content": "Acme Store. Order ids look like O-12345."},
        {"role": "user", "content": f"What is the total of order {order} in EUR?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_order", "arguments": json.dumps({"order_id": order})},
                }
            ],
        },
        {"role": "tool", "content": json.dumps(result), "tool_call_id": "call_1"},
        {"role": "assistant", "content": f"Order {order} of {customer} is shipped."},
    ]


def _ids(messages: list[dict[str, Any]]) -> list[str]:
    """The ids after the system turn."""
    return re.findall(r"\b[OC]-\d+\b", json.dumps(messages[1:]))


def test_one_fresh_id_everywhere_the_old_one_was() -> None:
    before = _trajectory()
    after = rekey_messages(before, IDS, random.Random(0))
    old, new = _ids(before), _ids(after)
    assert len(old) == len(new)
    mapping = dict(zip(old, new, strict=True))
    assert len(set(mapping.values())) == 2  # one new order id, one new customer id
    assert mapping["O-10664"] != "O-10664" and mapping["C-0273"] != "C-0273"
    assert re.fullmatch(r"O-[1-9]\d{4}", mapping["O-10664"])  # same shape, still 5 digits
    assert re.fullmatch(r"C-\d{4}", mapping["C-0273"])
    # the arguments string is still valid JSON and names the id the user now asks about
    call = json.loads(after[2]["tool_calls"][0]["function"]["arguments"])
    assert call["order_id"] in after[1]["content"]
    assert json.loads(after[3]["content"])["total_usd"] == 40.34


def test_only_matched_ids_change() -> None:
    before = _trajectory()
    after = rekey_messages(before, IDS, random.Random(1))
    strip = re.compile(r"\b[OC]-\d+\b")
    assert strip.sub("ID", json.dumps(before)) == strip.sub("ID", json.dumps(after))
    assert after[0] == before[0]  # the system turn is instructions, the same at evaluation


def test_distinct_ids_stay_distinct_and_never_take_another_original() -> None:
    # two ids with one digit each: few shapes, so collisions would be likely without the check
    msgs = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "O-1, O-2, C-3"}]
    for seed in range(200):
        after = _ids(rekey_messages(msgs, IDS, random.Random(seed)))
        assert len(set(after)) == 3


def test_longer_id_is_not_rewritten_through_a_shorter_one() -> None:
    msgs = [
        {"role": "system", "content": "Hi"},
        {"role": "user", "content": "O-12 and O-123 and O-1234"},
    ]
    after = rekey_messages(msgs, IDS, random.Random(3))[1]["content"]
    assert [len(part) for part in after.split(" and ")] == [4, 5, 6]


@given(st.text(alphabet="0123456789-AB", min_size=1, max_size=12), st.integers(0, 10**6))
def test_redraw_keeps_shape(value: str, seed: int) -> None:
    out = redraw_digits(value, random.Random(seed))
    assert len(out) == len(value)
    for a, b in zip(value, out, strict=True):
        assert a.isdigit() == b.isdigit()
        if not a.isdigit():
            assert a == b


def test_passes_are_fresh_and_reproducible() -> None:
    trajs = [{"trajectory_id": f"t{i}", "messages": _trajectory(f"O-1000{i}")} for i in range(5)]
    first = rekeyed_passes(trajs, IDS, passes=2, seed=0)
    again = rekeyed_passes(trajs, IDS, passes=2, seed=0)
    assert first == again  # a resumed run rebuilds the same data
    assert len(first) == 10
    pass0 = {_ids(t["messages"])[0] for t in first[:5]}
    pass1 = {_ids(t["messages"])[0] for t in first[5:]}
    assert not pass0 & pass1  # a new draw per pass (40,000+ shapes: no accidental repeat)
    assert all(t["trajectory_id"] == f"t{i % 5}" for i, t in enumerate(first))


def test_no_patterns_leaves_trajectories_alone() -> None:
    msgs = _trajectory()
    assert compile_patterns([]) is None
    assert rekey_messages(msgs, None, random.Random(0)) == msgs


@pytest.mark.parametrize("pattern", ["[unclosed", "x*"])
def test_bad_patterns_fail_before_training(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"sft\.rekey_ids"):
        compile_patterns([pattern])
