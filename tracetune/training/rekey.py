"""Re-keyed identifiers: fresh ids in every training pass, so the model reads, not remembers.

Why: production logs come from one fixed world (the same orders and customers again and again).
A small model fits them by remembering the world (order O-10664 -> "answer its status",
customer C-0095 -> "silver") instead of reading the question and the tool results, and then fails
on every id it has not seen. Replacing each identifier with a fresh one of the same shape,
consistently within a trajectory (the user's text, the call's arguments and the tool result
all say the new id), keeps every trajectory a correct worked example while making the world
useless to memorise. A new draw per pass means no id is ever seen twice.

Which strings are identifiers is the environment's knowledge, so the patterns are params
(`sft.rekey_ids`); only digits are re-drawn (`O-10664` -> `O-53870`), so the shape stays.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any


def compile_patterns(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """The `sft.rekey_ids` regexes as one alternation (None: no re-keying).

    A bad regex fails with its text before any training. One scan finds and rewrites every
    kind of id, so an id written by one pattern is never rewritten by another.
    """
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"sft.rekey_ids: invalid regex {pattern!r}: {exc}") from exc
        if regex.search("") is not None:
            raise ValueError(f"sft.rekey_ids: {pattern!r} matches the empty string")
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def redraw_digits(value: str, rng: random.Random) -> str:
    """`value` with every digit re-drawn; a leading non-zero digit stays non-zero."""
    out = []
    for i, ch in enumerate(value):
        if ch.isdigit():
            first_of_run = i == 0 or not value[i - 1].isdigit()
            low = 1 if first_of_run and ch != "0" else 0
            out.append(str(rng.randint(low, 9)))
        else:
            out.append(ch)
    return "".join(out)


def rekey_messages(
    messages: list[dict[str, Any]], ids: re.Pattern[str] | None, rng: random.Random
) -> list[dict[str, Any]]:
    """`messages` with each distinct identifier replaced by one fresh id, everywhere it occurs
    after the system turn.

    Distinct ids stay distinct (the mapping is one-to-one within the trajectory), and a fresh id
    never equals another original id of the same trajectory, so no two entities merge.
    """
    if ids is None:
        return messages
    # The system turn is the same in every episode (and at evaluation): an id written there
    # (an example, a policy) is part of the instructions, not of this trajectory's world.
    head = [m for m in messages[:1] if m.get("role") == "system"]
    body = messages[len(head) :]
    text = json.dumps(body, ensure_ascii=False)
    originals = list(dict.fromkeys(m.group(0) for m in ids.finditer(text)))
    if not originals:
        return messages
    taken = set(originals)
    mapping: dict[str, str] = {}
    for original in originals:
        fresh = redraw_digits(original, rng)
        for _ in range(100):  # an id with one or two digits has few shapes: may keep its own
            if fresh not in taken:
                break
            fresh = redraw_digits(original, rng)
        else:
            fresh = original
        taken.add(fresh)
        mapping[original] = fresh
    # The same scan that found them: nothing but a matched id is rewritten, and only once.
    rewritten = ids.sub(lambda m: mapping[m.group(0)], text)
    out: list[dict[str, Any]] = json.loads(rewritten)
    return head + out


def rekeyed_passes(
    trajectories: Sequence[dict[str, Any]],
    ids: re.Pattern[str] | None,
    passes: int,
    seed: int,
    first_pass: int = 0,
) -> list[dict[str, Any]]:
    """`passes` copies of the trajectories, each copy with its own fresh ids.

    Seeded by (seed, trajectory id, pass), so a resumed run rebuilds the same data; passes are
    numbered from `first_pass` (a caller that builds its epochs one at a time).
    """
    out = []
    for p in range(first_pass, first_pass + passes):
        for i, traj in enumerate(trajectories):
            key = f"{seed}:{traj.get('trajectory_id', i)}:{p}"
            rng = random.Random(key)
            out.append({**traj, "messages": rekey_messages(traj["messages"], ids, rng)})
    return out
