"""Grounded tool arguments: values the environment declares copied-from-the-conversation are
decoded under that constraint.

Why: an agent's commonest fatal slip is a hallucinated identifier: an order id, an email, a
product name that is nowhere in the conversation. Small models make it all the time (the
embedded default writes a training pseudonym for the user's email, docs/training.md), and no
amount of prompting removes it. Where a tool's argument can only be a value the user or a tool
result has already shown (an id, an email, the currency the user asked for), the environment
says so (`Tool.grounded`), and the decoder lets the model choose only among those values: the
model still decides *which* value and *whether* to call, the runtime rules out values that
cannot be right. The same idea as JSON-schema-guided decoding (enums, patterns), with the
allowed values read from the conversation instead of the schema.

How: while a turn is generated, the text after `<tool_call>` is watched; inside the value of a
grounded argument, every token that would make the value stop being a prefix of some candidate
(or close it on a non-candidate) is masked out. Candidates are spans of the user and tool
messages (never the system prompt): matches of the argument's `pattern`, standalone numbers for
`number` arguments, else runs of up to `MAX_WORDS` words. No candidate in the conversation:
the argument is left free (the tool's error then tells the agent). Token texts come from
decoding each id alone; a value with characters a byte-level tokenizer splits mid-character is
not matched, and stays free.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tracetune.environments.base import STANDALONE_NUMBER, Grounded

MAX_WORDS = 6  # longest free-text span offered as a candidate (a product name, a city)
# Whitespace allowed between `"key":` and a grounded value. Bounded: SmolLM2's byte-level BPE has
# hundreds of whitespace-only tokens (runs of spaces, tabs, newlines), and an unbounded allowance
# let a value never start (the mask offered whitespace forever).
MAX_LEADING_SPACE = 2
_TOOL_CALL = re.compile(r"<tool_call>((?:(?!</tool_call>).)*)$", re.S)
_NAME = re.compile(r'"name"\s*:\s*"([^"\\]*)"')
# The argument being written: `"arguments": {..., "key": <rest of the text>` (rest: the value so
# far). Keys of earlier arguments are skipped by the greedy `.*`.
_ARGUMENT = re.compile(r'"arguments"\s*:\s*\{(?:.*[,{]\s*|\s*)"([A-Za-z_]\w*)"\s*:(.*)$', re.S)
_WORD_EDGE = "\"'`.,;:!?()[]{}<>"
NUMBER_ENDS = (",", "}", " ", "\n")  # a number's end is part of its expected text
AFTER_STRING = ",}] \n\t"  # what may follow a closing quote in the same token


GroundingSpec = Mapping[str, Mapping[str, Grounded]]  # tool name -> argument -> rule


def argument_in_progress(text: str, spec: GroundingSpec) -> tuple[Grounded, str] | None:
    """(rule, text written so far for the value) when `text` (a turn being generated) ends
    inside the value of a grounded argument, else None."""
    call = _TOOL_CALL.search(text)
    if call is None:
        return None
    body = call.group(1)
    name = _NAME.search(body)
    arg = _ARGUMENT.search(body)
    if name is None or arg is None:
        return None
    rule = spec.get(name.group(1), {}).get(arg.group(1))
    if rule is None:
        return None
    rest = arg.group(2)
    written = rest.lstrip()
    if rule.number:
        return (rule, written) if re.fullmatch(r"-?[\d.]*", written) else None
    if written == "":
        return rule, rest
    if not written.startswith('"') or '"' in written[1:]:
        return None  # not a string value, or one already closed
    return rule, rest


def candidates(rule: Grounded, sources: Sequence[str]) -> list[str]:
    """The values the argument may take: spans of the conversation's user and tool messages."""
    found: dict[str, None] = {}
    for text in sources:
        if rule.number:
            spans = STANDALONE_NUMBER.findall(text)
        elif rule.pattern is not None:
            spans = [m.group(0) for m in re.finditer(rule.pattern, text)]
        else:
            spans = word_runs(text)
        found.update(dict.fromkeys(s for s in spans if s))
    return list(found)


def word_runs(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Runs of 1..max_words whitespace-separated words, punctuation trimmed at both ends."""
    words = text.split()
    runs = []
    for i in range(len(words)):
        for j in range(i + 1, min(i + max_words, len(words)) + 1):
            run = " ".join(words[i:j]).strip(_WORD_EDGE)
            if run:
                runs.append(run)
    return runs


def expected_texts(rule: Grounded, values: Sequence[str]) -> list[str]:
    """What the model may write from the value's start on: a JSON string of a candidate, or a
    number followed by what can end it."""
    if rule.number:
        return [v + end for v in values for end in NUMBER_ENDS]
    return [json.dumps(v) for v in values]


class Vocabulary:
    """Each token's text, indexed for the two questions the mask asks: which tokens are a
    prefix of a text, and which tokens write all of it and go on."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.by_text: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            if t:
                self.by_text.setdefault(t, []).append(i)
        self.sorted_texts = sorted(self.by_text)
        self.whitespace = [i for t, ids in self.by_text.items() if t.isspace() for i in ids]
        self.longest = max((len(t) for t in self.by_text), default=0)

    @classmethod
    def of(cls, tokenizer: Any) -> Vocabulary:
        size = len(tokenizer)
        return cls([tokenizer.decode([i]) for i in range(size)])

    def prefixes_of(self, text: str) -> list[int]:
        out: list[int] = []
        for k in range(1, min(len(text), self.longest) + 1):
            out += self.by_text.get(text[:k], [])
        return out

    def past_the_end(self, text: str, then: str = "") -> list[int]:
        """Tokens that write all of `text` and go on, with one of `then` next (any: empty)."""
        lo = bisect.bisect_left(self.sorted_texts, text)
        out: list[int] = []
        for t in self.sorted_texts[lo:]:
            if not t.startswith(text):
                break
            if len(t) > len(text) and (not then or t[len(text)] in then):
                out += self.by_text[t]
        return out


def allowed_tokens(
    rule: Grounded, written: str, values: Sequence[str], vocab: Vocabulary
) -> set[int] | None:
    """Token ids that keep the value on the way to a candidate; None: leave the token free.

    `written` is the value's text so far, leading whitespace included (string values: from
    the opening quote). A token may end the value and go on (`"}}` after an id) with what JSON
    allows next; the rest of the call is left to the model and the parser.
    """
    started = written.lstrip()
    remaining = [e[len(started) :] for e in expected_texts(rule, values) if e.startswith(started)]
    remaining = [r for r in remaining if r]
    if not remaining:
        return None
    ids: set[int] = set()
    room = 0 if started else MAX_LEADING_SPACE - len(written)  # whitespace still allowed
    for rest in dict.fromkeys(remaining):
        for text in (rest, " " + rest) if room > 0 else (rest,):  # " 4", ' "O': the space
            ids.update(vocab.prefixes_of(text))
            ids.update(vocab.past_the_end(text, "" if rule.number else AFTER_STRING))
    if room > 0:
        ids.update(i for i in vocab.whitespace if len(vocab.texts[i]) <= room)
    return ids or None


def conversation_sources(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The texts grounded values may come from: user and tool messages, not the system turn."""
    out = []
    for m in messages:
        if m.get("role") not in ("user", "tool"):
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif content is not None:
            out.append(json.dumps(content))
    return out


class Grounding:
    """The decode loop's constraint for one batch: `mask(row, token_ids)` gives the allowed
    ids of a row's next token, or None when the row is not inside a grounded value.

    `rows`: each row's conversation so far; `forced`: text every turn starts with before its
    generated tokens (a policy's response prefix)."""

    def __init__(
        self,
        vocab: Vocabulary,
        spec: GroundingSpec,
        rows: Sequence[Sequence[Mapping[str, Any]]],
        forced: str = "",
    ) -> None:
        self.vocab, self.spec, self.forced = vocab, spec, forced
        self.sources = [conversation_sources(messages) for messages in rows]
        self._values: dict[tuple[int, Grounded], list[str]] = {}
        self._texts: dict[int, tuple[int, str]] = {}  # row -> (tokens read, text so far)

    def mask(self, row: int, token_ids: Sequence[int]) -> set[int] | None:
        text = self._text(row, token_ids)
        state = argument_in_progress(text, self.spec)
        if state is None:
            return None
        rule, written = state
        key = (row, rule)
        if key not in self._values:
            self._values[key] = candidates(rule, self.sources[row])
        values = self._values[key]
        if not values:
            return None
        return allowed_tokens(rule, written, values, self.vocab)

    def _text(self, row: int, token_ids: Sequence[int]) -> str:
        """The row's turn so far, extended by its new tokens only (called once per step: the
        decode loop's hot path, so no re-join of the whole turn)."""
        read, text = self._texts.get(row, (0, self.forced))
        if read > len(token_ids):  # a different sequence for this row: start over
            read, text = 0, self.forced
        texts = self.vocab.texts
        text += "".join(texts[t] if t < len(texts) else "" for t in token_ids[read:])
        self._texts[row] = (len(token_ids), text)
        return text


def logits_processor(grounding: Grounding, prompt_width: int, counts: dict[str, int]) -> Any:
    """The same constraint for `model.generate` (the hf decoder): a transformers
    `LogitsProcessor` over a left-padded batch whose prompts are `prompt_width` wide; `counts`
    receives tokens decoded under the mask and those where it overrode the model's choice."""
    from transformers import LogitsProcessor

    from tracetune.agent.decoding import only

    class _Grounded(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for row in range(scores.shape[0]):
                allowed = grounding.mask(row, input_ids[row, prompt_width:].tolist())
                if not allowed:
                    continue
                counts["constrained"] += 1
                counts["overridden"] += int(scores[row].argmax()) not in allowed
                scores[row] = only(scores[row], allowed)
            return scores

    return _Grounded()
