"""Conversations longer than `sft.max_length` become several examples instead of none.

Production agents hold conversations of 5-10k tokens behind a policy of a few thousand; a
tiny or mid-size model trains at 1-4k. Dropping every conversation that does not fit (what SFT
did until issue 18: "no training example fits max_length") throws away exactly the long,
realistic episodes. Instead (the strategy, docs/training.md "Long conversations"):

1. Nothing after the last assistant turn is trained, so a conversation ending with the user's
   goodbye or a tool result is cut after its last assistant turn first.
2. A conversation that fits is one example, as before.
3. A longer one is cut into windows, each `system prompt + the latest messages that fit`,
   ending at an assistant turn. Every assistant turn is trained in exactly one window: the
   first window that can end at it, with as much history before it as fits (the oldest turns
   are dropped; the system prompt and the latest turns stay). A window goes on to later turns
   while they fit without moving its start. Earlier assistant turns inside a window are context
   there, masked out of the loss (they were trained in their own window).
4. A window starts at a user or assistant message, never at a tool result whose call it
   would not show; a turn always keeps the messages it answers (the user's question, or its
   tool call with the results).
5. A system prompt that takes more than half of `max_length` (a long policy) keeps its head,
   cut to that half, so that there is room for the conversation; the cut is counted.
6. An assistant turn that fits in no window even so (a single message over the budget) is
   dropped and counted; the stage fails only when no turn of any conversation fits.

The windows of one conversation share their system turn and tool listing token for token, so
shared-prefix batches (`tracetune/training/prefix.py`) still run that prefix once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tracetune.trajectories.schema import message_text

Encode = Callable[[Sequence[dict[str, Any]]], Any]  # messages -> TokenizedExample-like
PER_MESSAGE = 5  # template tokens around a message (role header, end of turn), estimated


@dataclass
class CutReport:
    """What fitting conversations into `max_length` cost (metrics + log of the sft stage)."""

    conversations: int = 0
    windowed: int = 0  # longer than max_length: split into windows
    examples: int = 0  # training examples made (windows included)
    turns_trained: int = 0
    turns_dropped: int = 0  # assistant turns that fit in no window: never trained
    conversations_dropped: int = 0  # conversations none of whose turns fit
    no_assistant_turn: int = 0  # nothing to learn from (skipped)
    tail_messages_cut: int = 0  # messages after the last assistant turn (never trained)
    history_tokens_cut: int = 0  # tokens (estimated) of older turns left out of the windows
    system_prompts_cut: int = 0  # conversations whose system prompt was cut to fit
    system_tokens_cut: int = 0
    over_context: int = 0  # conversations longer than the model's context
    longest: int = 0  # tokens of the longest conversation seen

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def scaled(self, passes: int) -> dict[str, int]:
        """Per epoch of data (the dataset holds `passes` re-drawn copies)."""
        return {k: (v if k == "longest" else v // passes) for k, v in asdict(self).items()}


def assistant_indices(messages: Sequence[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def minimal_start(body: Sequence[dict[str, Any]], turn: int) -> int:
    """The latest start that keeps what turn `turn` answers: the user message just before it,
    or the assistant call whose tool results come just before it (with those results)."""
    i = turn - 1
    while i >= 0 and body[i].get("role") == "tool":
        i -= 1
    if i < 0:
        return 0
    if i == turn - 1 and body[i].get("role") == "assistant":
        return turn  # follows another assistant turn: nothing to keep
    return i


def valid_starts(body: Sequence[dict[str, Any]], upto: int) -> list[int]:
    """Starts at or before `upto` that do not open on a tool result."""
    return [s for s in range(upto + 1) if body[s].get("role") != "tool"]


def mask_runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s: one per assistant turn in the template's output."""
    runs, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def untrain_first_turns(example: Any, turns: int) -> None:
    """Mask out the first `turns` assistant turns of `example` (context, trained elsewhere)."""
    if turns <= 0:
        return
    for a, b in mask_runs(example.assistant_masks)[:turns]:
        example.assistant_masks[a:b] = [0] * (b - a)


def truncate_system(
    system: dict[str, Any],
    encode: Encode,
    count_text: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    budget: int,
) -> tuple[dict[str, Any], int]:
    """The system message cut (its head kept) so that the system turn takes at most `budget`
    tokens; returns it and the number of content tokens cut (0: unchanged)."""
    content = system.get("content")
    if not isinstance(content, str):
        return system, 0
    total = len(encode([system]).input_ids)
    if total <= budget:
        return system, 0
    ids = count_text(content)
    keep = max(0, len(ids) - (total - budget))
    for _ in range(4):  # decode/encode round trips may shift a token or two
        cut = dict(system, content=decode(ids[:keep]))
        over = len(encode([cut]).input_ids) - budget
        if over <= 0:
            return cut, len(ids) - keep
        keep = max(0, keep - over - 2)
    return dict(system, content=""), len(ids)


def conversation_examples(
    messages: Sequence[dict[str, Any]],
    encode: Encode,
    max_length: int,
    report: CutReport,
    count_text: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    context: int | None = None,
) -> list[Any]:
    """Training examples of one conversation under `max_length` (see the module docstring)."""
    report.conversations += 1
    turns = assistant_indices(messages)
    if not turns:
        report.no_assistant_turn += 1
        return []
    report.tail_messages_cut += len(messages) - 1 - turns[-1]
    messages = list(messages[: turns[-1] + 1])
    full = encode(messages)
    length = len(full.input_ids)
    report.longest = max(report.longest, length)
    if context is not None and length > context:
        report.over_context += 1
    if length <= max_length:
        report.examples += 1
        report.turns_trained += len(turns)
        return [full]
    report.windowed += 1
    has_system = messages[0].get("role") == "system"
    system = messages[:1] if has_system else []
    body = messages[len(system) :]
    if has_system:
        cut_system, cut = truncate_system(system[0], encode, count_text, decode, max_length // 2)
        if cut:
            report.system_prompts_cut += 1
            report.system_tokens_cut += cut
            system = [cut_system]
    return _windows(system, body, encode, max_length, report, count_text)


def _windows(
    system: list[dict[str, Any]],
    body: list[dict[str, Any]],
    encode: Encode,
    max_length: int,
    report: CutReport,
    count_text: Callable[[str], list[int]],
) -> list[Any]:
    """Windows over `body` (see the module docstring). Lengths are searched on per-message
    estimates (one tokenizer call per message, not per candidate window) and every window
    kept is encoded exactly and shrunk until it fits."""
    turns = assistant_indices(body)
    sizes = [len(count_text(message_text(m))) + PER_MESSAGE for m in body]
    system_len = len(encode(system).input_ids) if system else 0
    prefix = [0]
    for n in sizes:
        prefix.append(prefix[-1] + n)

    def estimate(start: int, end: int) -> int:
        return system_len + prefix[end + 1] - prefix[start]

    history_room = (max_length - system_len) // 2
    examples, i = [], 0
    while i < len(turns):
        first = turns[i]
        lowest = minimal_start(body, first)
        starts = valid_starts(body, lowest)
        # history first, up to half the room; then later turns; then history again
        start = next((s for s in starts if estimate(s, first) <= system_len + history_room), lowest)
        start = max(start, 0)
        j = i + 1
        while j < len(turns) and estimate(start, turns[j]) <= max_length:
            j += 1
        start = next((s for s in starts if estimate(s, turns[j - 1]) <= max_length), lowest)
        example, start, j = _fit(system, body, encode, max_length, turns, i, j, start, starts)
        if example is None:
            report.turns_dropped += 1
            i += 1
            continue
        untrain_first_turns(example, sum(1 for t in turns if start <= t < first))
        report.history_tokens_cut += prefix[start]
        report.turns_trained += j - i
        report.examples += 1
        examples.append(example)
        i = j
    if not examples:
        report.conversations_dropped += 1
    return examples


def _fit(
    system: list[dict[str, Any]],
    body: list[dict[str, Any]],
    encode: Encode,
    max_length: int,
    turns: list[int],
    i: int,
    j: int,
    start: int,
    starts: list[int],
) -> tuple[Any, int, int]:
    """The window (start, turns i..j-1) encoded; while too long, drop its last new turn, then
    its oldest history. (None, ...) when turn i alone does not fit."""
    while True:
        example = encode(system + body[start : turns[j - 1] + 1])
        if len(example.input_ids) <= max_length:
            return example, start, j
        if j - 1 > i:
            j -= 1
            continue
        later = [s for s in starts if s > start]
        if not later:
            return None, start, j
        start = later[0]
