"""PII scrub: detectors, keyed pseudonyms, consistency inside a trajectory."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracetune.config import PiiParams
from tracetune.trajectories.pii import (
    Scrubber,
    find_pii,
    has_pseudonym,
    is_email_pseudonym,
    luhn_ok,
    pii_in,
)


@pytest.fixture
def scrubber() -> Scrubber:
    return Scrubber(PiiParams(), key=b"test-key")


@pytest.mark.parametrize(
    "text",
    [
        "mail me at ana.smith1@example.com please",
        "Call +1-555-123-4567 now",
        "call (555) 123-4567",
        "ring +44 20 7946 0958",
        "card 4111 1111 1111 1111 exp 12/29",
        "card 4111-1111-1111-1111",
    ],
)
def test_detects_pii(text: str, scrubber: Scrubber) -> None:
    assert find_pii(text)
    scrubbed = scrubber.scrub_text(text)
    assert not find_pii(scrubbed), scrubbed
    assert has_pseudonym(scrubbed)


@pytest.mark.parametrize(
    "text",
    [
        "Order O-10423 created 2026-10-09 total 40.34 USD",
        "customer C-0042 at 2026-11-01T00:00:06+00:00",
        "calculate 12.50 + 7.25 + 100.00",
        "JPY 151200.00, qty 3",
    ],
)
def test_leaves_ids_dates_and_amounts_alone(text: str, scrubber: Scrubber) -> None:
    assert find_pii(text) == []
    assert scrubber.scrub_text(text) == text


def test_pseudonyms_are_consistent_and_case_insensitive(scrubber: Scrubber) -> None:
    a = scrubber.scrub_text("I'm Ana.Smith1@Example.com")
    b = scrubber.scrub_text('{"email": "ana.smith1@example.com"}')
    pseudonym = a.split()[-1]
    assert pseudonym in b and pseudonym != "ana.smith1@example.com"
    # the shape of a real address (a model learns to copy emails, not a hex tag), same domain
    assert re.fullmatch(r"[a-z]+\.[a-z]+\d{16}@example\.com", pseudonym)
    assert is_email_pseudonym(pseudonym) and not is_email_pseudonym("ana.smith1@example.com")


def test_scrub_is_idempotent(scrubber: Scrubber) -> None:
    once = scrubber.scrub_text("x@y.org +1-555-123-4567 4111 1111 1111 1111")
    assert scrubber.scrub_text(once) == once


def test_different_keys_give_different_pseudonyms() -> None:
    text = "ana@example.com"
    assert Scrubber(PiiParams(), key=b"a").scrub_text(text) != Scrubber(
        PiiParams(), key=b"b"
    ).scrub_text(text)


def test_luhn_option() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    strict = Scrubber(PiiParams(card_luhn=True), key=b"k")
    assert strict.scrub_text("id 4111111111111112") == "id 4111111111111112"
    assert "<card:" in strict.scrub_text("id 4111111111111111")


def test_kinds_can_be_switched_off() -> None:
    only_phones = Scrubber(PiiParams(emails=False, cards=False), key=b"k")
    text = "ana@example.com +1-555-123-4567"
    out = only_phones.scrub_text(text)
    assert out.startswith("ana@example.com") and "<phone:" in out
    assert Scrubber(PiiParams(enabled=False), key=b"k").scrub_text(text) == text


def test_trajectory_stays_coherent(scrubber: Scrubber) -> None:
    """find_customer: the email in the user text, the arguments and the result is one pseudonym."""
    email = "dara.berg64@example.com"
    record: dict[str, Any] = {
        "task_id": f"latest_order_by_email:{email}",
        "messages": [
            {
                "role": "user",
                "content": f"I'm {email}. Status of my latest order? Call 555-201-3344.",
            },
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "find_customer",
                            "arguments": json.dumps({"email": email}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"email": email})},
            {"role": "assistant", "content": "Your latest order is shipped."},
        ],
    }
    scrubber.scrub_obj(record)
    pseudonym = scrubber.pseudonym("email", email)
    text = json.dumps(record)
    assert email not in text and not pii_in(record)
    args = json.loads(record["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert args["email"] == pseudonym
    assert json.loads(record["messages"][2]["content"])["email"] == pseudonym
    assert pseudonym in record["messages"][0]["content"]
    assert record["task_id"] == f"latest_order_by_email:{pseudonym}"
    assert scrubber.counts["email"] == 4 and scrubber.counts["phone"] == 1


def test_escaped_text_is_scrubbed_after_decoding(scrubber: Scrubber) -> None:
    """PII after a JSON escape (a newline) is found: the scrub runs on decoded strings."""
    record = json.loads(json.dumps({"content": "hi\n555-123-4567\nj\u00f6rg@example.com"}))
    scrubber.scrub_obj(record)
    assert not pii_in(record) and "\n<phone:" in record["content"]


_PIECES = [
    "ana.smith1@example.com",
    "+1 555-201-3344",
    "4111 1111 1111 1111",
    "O-10423",
    "2026-11-01T00:00:00+00:00",
    "call me",
    "\x00",
    "\n",
    "1234.5678",
    "shipped",
]


@st.composite
def _json_objects(draw: st.DrawFn) -> Any:
    text = st.lists(st.sampled_from(_PIECES), max_size=4).map(" ".join)
    leaves = text | st.integers() | st.none()
    return draw(
        st.recursive(
            leaves,
            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
            max_leaves=12,
        )
    )


def _scrub_each_string(scrubber: Scrubber, value: Any) -> Any:
    if isinstance(value, str):
        return scrubber.scrub_text(value)
    if isinstance(value, list):
        return [_scrub_each_string(scrubber, v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_each_string(scrubber, v) for k, v in value.items()}
    return value


@settings(max_examples=200, deadline=None)
@given(_json_objects())
def test_scrub_obj_equals_scrubbing_every_string_alone(value: Any) -> None:
    """The one-pass prefilter over joined strings picks exactly the strings that need a scrub."""
    record = {"messages": [value]}
    one_by_one, joined = Scrubber(PiiParams(), key=b"k"), Scrubber(PiiParams(), key=b"k")
    expected = _scrub_each_string(one_by_one, record)
    assert joined.scrub_obj(record) == expected
    assert joined.counts == one_by_one.counts
