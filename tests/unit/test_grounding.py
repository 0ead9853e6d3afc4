"""Grounded tool arguments: the rule (pure functions), every path through the mask ends on a
candidate (real tokenizer), and the whole rollout path with a real tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rollout_support import tiny_model_dir

from tracetune.agent.grounding import (
    Grounding,
    Vocabulary,
    allowed_tokens,
    argument_in_progress,
    candidates,
    conversation_sources,
    word_runs,
)
from tracetune.agent.rollout import ModelPolicy, RolloutConfig, TurnRequest, run_rollouts
from tracetune.config import Pricing
from tracetune.environments.base import Grounded
from tracetune.environments.support_desk import EMAIL_PATTERN, SupportDesk

ORDER = Grounded(r"\bO-\d+\b")
SPEC = {
    "get_order": {"order_id": ORDER},
    "find_customer": {"email": Grounded(EMAIL_PATTERN)},
    "convert_currency": {"amount": Grounded(number=True)},
}
CALL = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": '


def test_the_value_being_written_is_found_only_inside_a_grounded_argument() -> None:
    assert argument_in_progress(CALL, SPEC) == (ORDER, " ")
    assert argument_in_progress(CALL + '"O-12', SPEC) == (ORDER, ' "O-12')
    assert argument_in_progress(CALL + '"O-12"}}', SPEC) is None  # closed
    assert argument_in_progress(CALL + '"O-12"}}\n</tool_call>', SPEC) is None
    assert argument_in_progress("The order O-12 is", SPEC) is None  # not a call
    other = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "1+'
    assert argument_in_progress(other, SPEC) is None  # not declared
    fx = '<tool_call>\n{"name": "convert_currency", "arguments": {"to_currency": "EUR", "amount": 4'
    assert argument_in_progress(fx, SPEC) == (Grounded(number=True), "4")
    assert argument_in_progress(fx + "7.5, ", SPEC) is None  # the number has ended


def test_candidates_come_from_user_and_tool_messages_only() -> None:
    messages = [
        {"role": "system", "content": "Example: O-99999, ops@example.com, 12.5"},
        {"role": "user", "content": "I'm ana.berg244@example.com. Status of O-10043?"},
        {"role": "tool", "content": {"order_id": "O-10044", "total_usd": 141.98, "qty": 2}},
    ]
    sources = conversation_sources(messages)
    assert len(sources) == 2
    assert candidates(ORDER, sources) == ["O-10043", "O-10044"]
    assert candidates(Grounded(EMAIL_PATTERN), sources) == ["ana.berg244@example.com"]
    assert candidates(Grounded(number=True), sources) == ["141.98", "2"]  # ids are not numbers


def test_word_runs_trim_punctuation_and_stop_at_max_words() -> None:
    runs = word_runs("How much is the Classic Chair?", max_words=2)
    assert "Classic Chair" in runs and "Chair" in runs and "How much" in runs
    assert "the Classic Chair" not in runs  # three words
    assert all(not r.endswith("?") for r in runs)


def test_the_mask_keeps_the_value_on_the_way_to_a_candidate() -> None:
    texts = ['"', '"O', "O", "-", "1", "2", '"}}', ' "', "x", " ", "12", '2"}}', "3"]
    vocab = Vocabulary(texts)
    ids = {t: i for i, t in enumerate(texts)}
    values = ["O-12"]
    start = allowed_tokens(ORDER, " ", values, vocab)
    assert start is not None and {texts[i] for i in start} == {'"', '"O', " ", ' "'}
    middle = allowed_tokens(ORDER, ' "O-1', values, vocab)
    assert middle is not None and {texts[i] for i in middle} == {"2", '2"}}'}
    end = allowed_tokens(ORDER, ' "O-12', values, vocab)
    assert end == {ids['"'], ids['"}}']}
    assert allowed_tokens(ORDER, ' "O-9', values, vocab) is None  # off every candidate: free


def test_whitespace_before_a_value_is_bounded() -> None:
    """Found on SmolLM2's vocabulary (hundreds of whitespace-only tokens): the mask offered
    whitespace before the value without limit, so a value could never start."""
    texts = [" ", "  ", "\n\t\t", "        ", '"O-12"', ' "O-12"']
    vocab = Vocabulary(texts)
    first = allowed_tokens(ORDER, "", ["O-12"], vocab)
    assert first is not None and {texts[i] for i in first} == {" ", "  ", '"O-12"', ' "O-12"'}
    second = allowed_tokens(ORDER, " ", ["O-12"], vocab)
    assert second is not None and {texts[i] for i in second} == {" ", '"O-12"', ' "O-12"'}
    third = allowed_tokens(ORDER, "  ", ["O-12"], vocab)
    assert third is not None and {texts[i] for i in third} == {'"O-12"'}  # no more space


def test_a_number_may_end_only_where_a_candidate_ends() -> None:
    texts = ["4", "47", "5", ".", ",", "}", "7", " "]
    vocab = Vocabulary(texts)
    allowed = allowed_tokens(Grounded(number=True), "47", ["475.2", "47"], vocab)
    assert allowed is not None
    assert {texts[i] for i in allowed} == {"5", ",", "}", " "}  # 475.2 goes on; 47 may end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def test_every_path_through_the_mask_writes_a_candidate(model_dir: Path) -> None:
    """Random walks over the real tokenizer's allowed tokens: each closes on a candidate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = Vocabulary.of(tokenizer)
    messages = [
        {"role": "user", "content": "I'm eli.novak344@example.com, is O-10043 or O-1004 mine?"},
        {"role": "tool", "content": '{"orders": [{"order_id": "O-11371"}]}'},
    ]
    grounding = Grounding(vocab, SPEC, [messages], forced=CALL)
    rng = random.Random(0)
    written = set()
    for _ in range(40):
        ids: list[int] = []
        for _ in range(40):
            allowed = grounding.mask(0, ids)
            if allowed is None:
                break
            ids.append(rng.choice(sorted(allowed)))
        text = "".join(vocab.texts[i] for i in ids)
        value = json.JSONDecoder().raw_decode(text.lstrip())[0]
        written.add(value)
    assert written <= {"O-10043", "O-1004", "O-11371"}
    assert len(written) > 1  # the walks really choose


def test_a_grounded_rollout_copies_the_users_email(model_dir: Path) -> None:
    """The whole path (environment declaration -> request -> decode hook) with a real model
    forced into find_customer's email: grounded, it writes the user's address; free, the
    barely-trained model writes something else."""
    env = SupportDesk()
    task = env.tasks(1, seed=0, families=["latest_order_by_email"])[0]
    email = task.id.split(":")[1]
    opening = '<tool_call>\n{"name": "find_customer", "arguments": {"email": "'
    config = RolloutConfig(max_new_tokens=24, max_turns=1, batch_size=1)

    def first_turn(grounding: bool) -> str:
        policy = ModelPolicy.from_pretrained(
            model_dir, name="tiny", device="cpu", response_prefix=opening, grounding=grounding
        )
        result = run_rollouts([task], policy, SupportDesk, config, pricing=Pricing())[0]
        counts = policy.grounding_counts
        assert grounding == (counts["constrained"] > 0)
        if grounding:  # the barely-trained model's own choice is not the email: overridden
            assert 0 < counts["overridden"] <= counts["constrained"]
        return result.turns[0].text[len(opening) :]

    assert first_turn(True).startswith(email + '"')
    assert not first_turn(False).startswith(email)


def test_requests_carry_the_environments_declarations() -> None:
    env = SupportDesk()
    declared = env.grounded_arguments()
    assert declared["find_customer"] == {"email": Grounded(EMAIL_PATTERN)}
    assert "calculate" not in declared  # an expression is composed, not copied
    assert "from_currency" not in declared["convert_currency"]
    schemas = json.dumps(env.tool_schemas())
    assert "pattern" not in schemas  # not in the prompt: the model reads the same tools
    request = TurnRequest(0, 0, env.tasks(1, seed=0)[0], [], env.tool_schemas())
    assert request.grounded == {}


def test_the_hf_decoder_grounds_the_same_way_as_the_loop(model_dir: Path) -> None:
    """`model.generate` with the grounding logits processor writes what the hand-written loop
    writes under the same mask (greedy), and counts the same tokens."""
    env = SupportDesk()
    tasks = env.tasks(3, seed=1, families=["latest_order_by_email", "order_total_fx"])
    opening = '<tool_call>\n{"name": "find_customer", "arguments": {"email": "'
    requests = [
        TurnRequest(i, 0, t, env.reset(t), env.tool_schemas(), env.grounded_arguments())
        for i, t in enumerate(tasks)
    ]

    def turns(decoder: str) -> tuple[list[str], dict[str, int]]:
        policy = ModelPolicy.from_pretrained(
            model_dir,
            device="cpu",
            max_new_tokens=24,
            decoder=decoder,
            response_prefix=opening,
            grounding=True,
        )
        return [o.text for o in policy.generate(requests)], policy.grounding_counts

    (loop, loop_counts), (hf, hf_counts) = turns("loop"), turns("hf")
    assert hf == loop
    assert hf_counts == loop_counts and loop_counts["constrained"] > 0
    email = tasks[0].id.split(":")[1]
    assert loop[0][len(opening) :].startswith(email + '"')


def test_the_evaluation_cache_key_follows_the_grounding_switch_and_rules() -> None:
    """Cached rollouts are reused by key: grounding on/off must give another key, and the key
    covers the declarations themselves (code, not params), rule by rule."""
    from tracetune.config import parse_params
    from tracetune.evaluation.harness import cache_key, grounding_rules

    tasks = SupportDesk().tasks(2, seed=0)
    on = parse_params({})
    off = parse_params({"environment": {"grounded_arguments": False}})
    key_on = cache_key("some/model", tasks, on)
    assert key_on != cache_key("some/model", tasks, off)
    assert key_on == cache_key("some/model", tasks, parse_params({}))
    rules = grounding_rules(on)
    assert rules["get_order"] == {"order_id": [r"\bO-\d+\b", False]}
    assert rules["convert_currency"]["amount"] == [None, True]
    assert set(rules) == set(SupportDesk().grounded_arguments())
