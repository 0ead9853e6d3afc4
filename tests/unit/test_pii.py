"""PII scrub: detectors, keyed pseudonyms, consistency inside a trajectory."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracetune.config import PiiParams
from tracetune.trajectories.pii import (
    _MIN_PII_CHARS,
    PiiKeyMissing,
    Scrubber,
    _pii_in_recursive,
    find_pii,
    has_pseudonym,
    is_demo_source,
    is_email_pseudonym,
    key_for,
    luhn_ok,
    pii_in,
    resolve_key,
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


# --- issue 20.3 / 18.6: formats, numbers, structured fields, collisions, the key -----------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("call +15551234567 now", "+15551234567"),
        ("or 5551234567.", "5551234567"),
        ("mail jürgen.müller@example.de today", "jürgen.müller@example.de"),
        ("from josé@example.com", "josé@example.com"),
        ("ssn 123-45-6789 on file", "123-45-6789"),
        ("tel:+15551234567", "+15551234567"),
        ("Phone:555-123-4567", "555-123-4567"),
        ("phone 020 7946 0958 (UK)", None),  # national UK form: not a US number, kept
    ],
)
def test_formats_missed_before_are_found(text: str, value: str | None, scrubber: Scrubber) -> None:
    if value is None:
        uk = Scrubber(PiiParams(phone_region="GB"), key=b"test-key")
        assert "<phone:" in uk.scrub_text(text)
        return
    assert find_pii(text) == [value]
    out = scrubber.scrub_text(text)
    assert value not in out and has_pseudonym(out) and not find_pii(out)


def test_e164_and_national_forms_are_one_pseudonym(scrubber: Scrubber) -> None:
    forms = ["+15551234567", "5551234567", "(555) 123-4567", "+1-555-123-4567", "555.123.4567"]
    assert len({scrubber.scrub_text(f"tel {f}") for f in forms}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "0.04999999999999716",  # a float's digits are not a card (issue 18: 219 broken results)
        "ratio 0.4111111111111111 done",
        "4111111111111111.5",
        "trace_4111111111111111",
        "id-4111111111111111",
        "v4111111111111111",
        "order 4111111111111112",  # 16 digits, Luhn fails
        "2026-11-01 12:00",
        "at 10:30 5551234",
        "O-10423 and C-0042",
        "total 1234567.89 USD",
        "ssn 000-12-3456 / 666-12-3456 / 123-00-4567",  # never issued
    ],
)
def test_numbers_inside_floats_and_ids_are_left_alone(text: str, scrubber: Scrubber) -> None:
    assert find_pii(text) == []
    assert scrubber.scrub_text(text) == text


def test_tool_results_stay_valid_json_with_their_floats(scrubber: Scrubber) -> None:
    result = {
        "customer_id": "C-0007",
        "name": "Ana Smith",
        "email": "ana.smith7@example.com",
        "phone": "5551234567",
        "balance": 0.04999999999999716,
        "rate": 1e-07,
        "big": 12345678901234567890,
        "zip": 94107,
        "note": "ring +1 555 201 3344\nthen 4111 1111 1111 1111",
    }
    for dump in (
        json.dumps(result, ensure_ascii=False, sort_keys=True),
        json.dumps(result, separators=(",", ":")),
    ):
        out = scrubber.scrub_text(dump)
        back = json.loads(out)  # still valid JSON
        assert back["balance"] == 0.04999999999999716 and back["rate"] == 1e-07
        assert back["big"] == 12345678901234567890 and back["customer_id"] == "C-0007"
        assert "0.04999999999999716" in out and not pii_in(back)
        assert back["name"].startswith("<name:") and back["zip"].startswith("<zip:")
        assert (", " in out) == (", " in dump)  # the text keeps its own separators
    plain = json.dumps({"price_usd": 0.04999999999999716, "qty": 3}, sort_keys=True)
    assert scrubber.scrub_text(plain) == plain  # nothing to replace: byte-identical


def _customer_trajectory() -> dict[str, Any]:
    found = {"customer_id": "C-0042", "name": "Ana Smith", "tier": "gold"}
    products = {"results": [{"name": "Blue Mug", "price_usd": 12.5, "product_id": "P-101"}]}
    return {
        "trajectory_id": "t-1",
        "messages": [
            {"role": "user", "content": "Hi, Ana Smith here. Which tier am I? Also the Blue Mug?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "find_customer", "arguments": '{"email": "x"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "c1",
                "name": "find_customer",
                "content": json.dumps(found),
            },
            {"role": "tool", "tool_call_id": "c2", "content": json.dumps(products)},
            {"role": "assistant", "content": "Ana Smith, you are gold; the Blue Mug is 12.50."},
        ],
        "final_answer": "Ana Smith, you are gold; the Blue Mug is 12.50.",
    }


def test_names_by_key_are_replaced_everywhere_in_the_conversation(scrubber: Scrubber) -> None:
    record = _customer_trajectory()
    scrubber.scrub_obj(record)
    text = json.dumps(record)
    assert "Ana Smith" not in text and "Ana" not in text
    pseudonym = json.loads(record["messages"][2]["content"])["name"]
    assert re.fullmatch(r"<name:[0-9a-f]{16}>", pseudonym)
    assert pseudonym in record["messages"][0]["content"]  # the user's own words
    assert record["final_answer"].startswith(pseudonym + ",")
    assert "Blue Mug" in text  # a product's `name` (no person beside it) stays
    assert record["messages"][2]["name"] == "find_customer"  # the message's tool name stays
    assert scrubber.counts["name"] == 4
    again = json.loads(json.dumps(record))
    assert scrubber.scrub_obj(again) == record  # idempotent


def test_pii_keys_are_configurable() -> None:
    params = PiiParams(keys=["nickname"], keys_beside={})
    scrub = Scrubber(params, key=b"test-key")
    record = {
        "messages": [
            {"role": "tool", "content": json.dumps({"nickname": "Bobby T", "name": "Widget"})},
            {"role": "user", "content": "Bobby T wants a Widget"},
        ]
    }
    scrub.scrub_obj(record)
    assert "Bobby T" not in json.dumps(record) and "Widget" in json.dumps(record)


def test_pseudonyms_do_not_collide() -> None:
    """Zero collisions over 100,000 distinct emails and card numbers (the old 10^6 email space
    gave ~49 per 10,000 and ~5,000 here). The math for 10M: n^2 / 2N expected collisions, with
    N = 40 x 25 x 10^14 = 1e17 email pseudonyms -> 5e-4, and N = 2^64 tags -> 3e-6."""
    from tracetune.trajectories.pii import EMAIL_DIGITS, PSEUDO_FIRST, PSEUDO_LAST, TAG_HEX

    scrub = Scrubber(PiiParams(), key=b"test-key")
    n = 100_000
    emails = {scrub.pseudonym("email", f"user{i}@example.com") for i in range(n)}
    cards = {scrub.pseudonym("card", f"4{i:015d}") for i in range(n)}
    assert len(emails) == n and len(cards) == n
    email_space = len(PSEUDO_FIRST) * len(PSEUDO_LAST) * 10**EMAIL_DIGITS
    assert (10**7) ** 2 / (2 * email_space) < 1e-3
    assert (10**7) ** 2 / (2 * 16**TAG_HEX) < 1e-5


def test_quarantine_raw_text_is_scrubbed(scrubber: Scrubber) -> None:
    """Undecodable text: PII after an escaped newline, in \\u escapes and under PII keys."""
    raw = (
        '{"trajectory_id": "latest_order_by_email:ana.smith1@example.com", "messages": '
        '[{"role": "user", "content": "hi\\n555-123-4567 j\\u00fcrgen.m\\u00fcller@example.de"},'
        ' {"role": "tool", "content": "{\\"customer_id\\": \\"C-1\\", \\"name\\": \\"Ana Smith\\", '
        '\\"zip\\": 94107'
    )
    out = scrubber.scrub_raw(raw)
    assert not find_pii(out) and not find_pii(out.replace("\\n", "\n"))
    for leaked in ("ana.smith1", "555-123-4567", "rgen", "Ana Smith", "94107"):
        assert leaked not in out, leaked
    valid = json.dumps({"trajectory_id": "x", "note": "call\n555-123-4567"})
    assert "<phone:" in json.loads(scrubber.scrub_raw(valid))["note"]


# --- the key ------------------------------------------------------------------------------------
def test_production_refuses_to_run_without_a_secret_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TRACETUNE_PII_KEY", raising=False)
    with pytest.raises(PiiKeyMissing, match="TRACETUNE_PII_KEY"):
        resolve_key(PiiParams(), demo=False)
    monkeypatch.setenv("TRACETUNE_PII_KEY", "short")
    with pytest.raises(PiiKeyMissing, match="at least 16"):
        resolve_key(PiiParams(), demo=False)
    monkeypatch.setenv("TRACETUNE_PII_KEY", "change-me-pii-secret")  # infra/.env.example's
    with pytest.raises(PiiKeyMissing, match="placeholder"):
        resolve_key(PiiParams(), demo=False)
    monkeypatch.setenv("TRACETUNE_PII_KEY", "a-real-secret-of-32-characters!!")
    key = resolve_key(PiiParams(), demo=False)
    assert key.value == b"a-real-secret-of-32-characters!!" and "TRACETUNE_PII_KEY" in key.origin
    assert "secret" not in repr(key)


def test_demo_key_is_random_per_workspace_and_kept_out_of_git(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TRACETUNE_PII_KEY", raising=False)
    a = PiiParams(demo_key_file=tmp_path / "a/.tracetune/pii.key")
    b = PiiParams(demo_key_file=tmp_path / "b/.tracetune/pii.key")
    key_a, key_b = resolve_key(a, demo=True), resolve_key(b, demo=True)
    assert key_a.value != key_b.value and len(key_a.value) == 64
    assert resolve_key(a, demo=True).value == key_a.value  # stable within the workspace
    assert a.demo_key_file.stat().st_mode & 0o777 == 0o600
    assert (a.demo_key_file.parent / ".gitignore").read_text().splitlines()[-1] == "*"
    # and in this repository: the default path is ignored by git and by DVC
    repo = Path(__file__).resolve().parents[2]
    default = PiiParams().demo_key_file
    ignored = subprocess.run(["git", "check-ignore", "-q", str(default)], cwd=repo, check=False)
    assert ignored.returncode == 0
    assert f"{default.parent}/" in (repo / ".dvcignore").read_text().split()


def test_which_sources_are_the_demo(tmp_path: Path) -> None:
    from tracetune.config import parse_params

    raw = tmp_path / "data/raw_logs"
    assert is_demo_source(str(raw), raw)
    assert is_demo_source(f"{tmp_path}/data/../data/raw_logs", raw)
    assert not is_demo_source(str(tmp_path / "prod_logs"), raw)
    assert not is_demo_source("s3://bucket/data/raw_logs", raw)
    demo = parse_params({})
    prod = parse_params({"ingest": {"source": "s3://logs/agent/"}})
    assert key_for(demo, tmp_path).origin == "environment variable TRACETUNE_PII_KEY"
    os.environ.pop("TRACETUNE_PII_KEY")
    try:
        assert key_for(demo, tmp_path).origin.startswith("demo workspace key")
        assert (tmp_path / ".tracetune/pii.key").exists()
        with pytest.raises(PiiKeyMissing):
            key_for(prod, tmp_path)
    finally:
        os.environ["TRACETUNE_PII_KEY"] = "tests-only-pii-pseudonym-key"


def test_the_flow_checks_the_key_before_any_stage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`Pipeline.start` calls this first (the slow flow test runs the whole refusal)."""
    from flows.retrain import share_pii_key
    from tracetune.config import parse_params

    monkeypatch.delenv("TRACETUNE_PII_KEY")
    prod = parse_params({"ingest": {"source": str(tmp_path / "agent-logs")}})
    with pytest.raises(PiiKeyMissing):
        share_pii_key(prod, tmp_path)
    share_pii_key(parse_params({}), tmp_path)  # the embedded demo: its workspace key
    assert (tmp_path / ".tracetune/pii.key").exists()


@pytest.mark.slow  # ~1 to 3 minutes: 10M HMACs in Python
def test_ten_million_distinct_emails_get_ten_million_pseudonyms() -> None:
    """The issue's figure itself: 10M distinct addresses, 0 shared pseudonyms (emails are the
    smaller space, 10^17; each pseudonym is kept as a 64-bit hash to fit in 80 MB)."""
    import hashlib

    import numpy as np

    scrub = Scrubber(PiiParams(), key=b"test-key")
    n = 10_000_000
    digests = np.empty(n, dtype=np.uint64)
    for i in range(n):
        pseudonym = scrub.pseudonym("email", f"user{i}@example.com").encode()
        digests[i] = int.from_bytes(hashlib.blake2b(pseudonym, digest_size=8).digest(), "big")
    assert len(np.unique(digests)) == n


def test_an_unknown_phone_region_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a region"):
        PiiParams(phone_region="XX")
    assert PiiParams(phone_region="gb").phone_region == "GB"


def test_pii_in_json_keys_is_replaced(scrubber: Scrubber) -> None:
    result = json.dumps({"ana.smith1@example.com": {"orders": 2}, "total": 0.04999999999999716})
    out = json.loads(scrubber.scrub_text(result))
    assert not find_pii(json.dumps(out)) and list(out)[1] == "total"
    assert out[scrubber.pseudonym("email", "ana.smith1@example.com")] == {"orders": 2}


_SHAPED = st.one_of(
    st.from_regex(
        r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
        r"(Z|[+-][0-9]{2}:[0-9]{2})?\Z",
        fullmatch=True,
    ),
    st.from_regex(r"\A[A-Za-z_]{1,6}(-[0-9]{1,14}){1,4}\Z", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(_SHAPED)
def test_timestamps_and_dashed_ids_skip_the_detectors_only_where_they_find_nothing(
    text: str,
) -> None:
    """The scrub's shortcut for whole timestamps and dashed ids (`tr-100-000000`, unique per
    trajectory, so never cached) is exact: the detectors, run anyway, leave the text alone."""
    from tracetune.trajectories.pii import _NO_PII_SHAPE

    assert text.isascii() and _NO_PII_SHAPE.fullmatch(text)
    detector = Scrubber(PiiParams(card_luhn=False, phone_min_digits=5), key=b"k")
    assert detector._scrub_string(text) == text  # the full path: no detector matches
    assert find_pii(text) == []
    assert detector.scrub_text(text) == text


def test_the_shape_shortcut_never_covers_pii_beside_a_timestamp_or_id(scrubber: Scrubber) -> None:
    for text in (
        "2026-11-01T00:00:21+00:00 +1 555 123 4567",
        "tr-100-000000 ana@example.com",
        "tr-100 555-123-4567",
        "+1 555 123 4567",
    ):
        assert scrubber.scrub_text(text) != text, text


# Characters the prefilter's alternatives are made of, a few others, non-ASCII digits and letters.
_PREFILTER_TEXT = st.text(alphabet="0123456789 ().-@+ax:_\u0660\u0661é", max_size=40)


@settings(max_examples=2000, deadline=None)
@given(_PREFILTER_TEXT)
def test_the_class_string_prefilter_is_the_regex_prefilter(text: str) -> None:
    """The faster prefilter (ASCII text mapped to character classes) answers exactly as the
    regex it replaces, digit groups and separator runs of every length included."""
    from tracetune.trajectories.pii import _PREFILTER, _prefilter_passes

    assert _prefilter_passes(text) == (_PREFILTER.search(text) is not None)


@pytest.mark.parametrize(
    "text",
    [
        "555-123-4567",
        "(555) 123 4567",
        "030 123456",
        "123-45-6789",
        "12-345678",
        "123  45  678",
        "123---45-678",
        "1234567",
        "2026-03-10",
        "x+1",
        "a@b",
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667",
    ],
)
def test_the_class_string_prefilter_on_the_shapes_it_names(text: str) -> None:
    from tracetune.trajectories.pii import _PREFILTER, _prefilter_passes

    assert _prefilter_passes(text) == (_PREFILTER.search(text) is not None)


_HINT_TEXT = st.text(alphabet='"NAMEnamezipZIP_ \u212a\u017fKks{}:', max_size=30)


@settings(max_examples=1000, deadline=None)
@given(_HINT_TEXT)
def test_the_lowered_key_hint_is_the_case_insensitive_one(text: str) -> None:
    """ASCII text lowered and searched case-sensitively finds a quoted PII key exactly when
    the case-insensitive regex does; other text (the Kelvin sign, a long s) takes the regex."""
    scrubber = Scrubber(PiiParams(keys=["zip", "Kind"], keys_beside={"name": ["id"]}), key=b"k")
    hint = scrubber._key_hint
    assert hint is not None
    assert scrubber._has_key_hint(text) == (hint.search(text) is not None)


def test_keyed_values_are_replaced_everywhere_after_the_faster_pass(scrubber: Scrubber) -> None:
    """The pass that replaces keyed values across the trajectory still reaches every string
    holding one (a loop over the values instead of a generator per string)."""
    result = json.dumps({"customer_id": "C-1", "name": "Ana Smith", "tier": "gold"})
    record = {
        "messages": [
            {"role": "tool", "content": result},
            {"role": "assistant", "content": "Ana Smith is gold."},
            {"role": "assistant", "content": "Nothing here."},
        ]
    }
    scrubber.scrub_obj(record)
    tag = scrubber.pseudonym("name", "Ana Smith")
    assert record["messages"][1]["content"] == f"{tag} is gold."
    assert record["messages"][2]["content"] == "Nothing here."
    assert json.loads(record["messages"][0]["content"])["name"] == tag


# Every character a detector's pattern or lookbehind names, letters (ASCII, accented, a non-ASCII
# digit) and line breaks: the shapes where "where can a match start" could go wrong.
_DETECTOR_TEXT = st.text(alphabet="0123456789 .-+()@:/,_%aZé\u0661\n", max_size=40)


_ONE_SCRUBBER: list[Scrubber] = []  # built once: a Scrubber per example was most of the time


@settings(max_examples=2000, deadline=None)
@given(_DETECTOR_TEXT)
def test_detectors_tried_at_match_starts_find_what_the_regex_finds(text: str) -> None:
    """The detectors run only where a match can start (`_match_starts`), yet find exactly the
    matches, kinds and replacements of the combined regex run over every position."""
    if not _ONE_SCRUBBER:
        _ONE_SCRUBBER.append(Scrubber(PiiParams(), key=b"k"))
    scrubber = _ONE_SCRUBBER[0]
    pattern = scrubber._pattern
    assert pattern is not None
    ours = [(m.span(), m.lastgroup) for m in scrubber._finditer(text)]
    assert ours == [(m.span(), m.lastgroup) for m in pattern.finditer(text)]
    assert scrubber._sub(text) == pattern.sub(scrubber._replace, text)


@pytest.mark.parametrize(
    "text",
    [
        "write to ana.smith1@example.com or +1-555-123-4567",
        "x.y@a.b@c.de",
        "(555) 123-4567 / 4111 1111 1111 1111 and 123-45-6789",
        "ring +44 20 7946 0958, or 030 1234567",
        "a-1234567 a.1234567 +1234567 (1234567",
    ],
)
def test_detector_start_positions_on_the_shapes_they_skip(text: str) -> None:
    scrubber = Scrubber(PiiParams(), key=b"k")
    pattern = scrubber._pattern
    assert pattern is not None
    assert [m.span() for m in scrubber._finditer(text)] == [
        m.span() for m in pattern.finditer(text)
    ]


_PII_LEAVES = st.one_of(
    st.sampled_from(
        [
            "ana.smith1@example.com",
            "a@b.cd",
            "call +1 415 555 0132",
            "(415) 555-0132",
            "4111 1111 1111 1111",
            "123-45-6789",
            "0.04999999999999716",
            "2026-11-01T00:00:21+00:00",
            "jürgen.müller@example.de",
            "mara.lind0381742290156317@example.com",
        ]
    ),
    _DETECTOR_TEXT,
    st.integers(),
    st.none(),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(
    st.recursive(
        _PII_LEAVES,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids),
        max_leaves=14,
    )
)
def test_pii_in_finds_what_the_recursive_walk_found(value: Any) -> None:
    """The stack walk with its length and prefilter tests finds the same values in the same
    order as calling `find_pii` on every string (short strings and the prefilter included)."""
    assert pii_in(value) == _pii_in_recursive(value)
    assert pii_in({"messages": [value]}) == _pii_in_recursive({"messages": [value]})


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="0123456789 .-+()@:/,_%aZé\u0661\n", max_size=_MIN_PII_CHARS - 1))
def test_no_detector_matches_under_the_minimum_length(text: str) -> None:
    """`pii_in` skips strings shorter than `_MIN_PII_CHARS`: no detector matches in one."""
    if not _ONE_SCRUBBER:
        _ONE_SCRUBBER.append(Scrubber(PiiParams(), key=b"k"))
    pattern = _ONE_SCRUBBER[0]._pattern
    assert pattern is not None and pattern.search(text) is None
    assert find_pii("a@b.cd") == ["a@b.cd"]  # the shortest match is exactly this long
