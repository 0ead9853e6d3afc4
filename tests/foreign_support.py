"""Logs shaped like another agent harness's (issue 18): real support-desk episodes, re-dressed.

The episodes come from the simulator over the real environment (so tool names, arguments and
outcomes are real); they are then logged the way the foreign harness of issue 18 logged them:
- no token usage and no cost (or zeros where a mapping filled placeholders),
- no `error_retries` label and no `final_answer` field,
- tool errors as plain text (`Error: ...`, `error: ...`) instead of `{"error": ...}`,
- conversations that end with the user's goodbye or with a hand-off tool's result,
- optionally a long policy as the system prompt.
"""

from __future__ import annotations

import json
import random
from typing import Any

from tracetune.config import parse_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.simulator import iter_log_lines

POLICY_CLAUSE = (
    "Clause {i}: when a customer asks about order {i:04d} or a refund above {amount} USD, check "
    "the order status first, quote the policy section {i}.{j} verbatim, never promise a date "
    "the carrier has not confirmed, and escalate to a human agent when the customer asks twice."
)


def long_policy(clauses: int, seed: int = 0) -> str:
    """A policy document of `clauses` numbered clauses (~50 tokens each on a BPE tokenizer)."""
    rng = random.Random(seed)
    return "\n".join(
        POLICY_CLAUSE.format(i=i, j=rng.randint(1, 9), amount=rng.randint(20, 500))
        for i in range(1, clauses + 1)
    )


def _text_error(content: str) -> str | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) == {"error"}:
        return str(value["error"])
    return None


def foreignise(record: dict[str, Any], rng: random.Random, zeros: bool = False) -> dict[str, Any]:
    """One of our records as the foreign harness logs it (see the module docstring)."""
    out = {k: v for k, v in record.items() if k not in ("usage", "cost_usd", "error_retries")}
    out.pop("final_answer", None)
    messages = [dict(m) for m in record["messages"]]
    for message in messages:
        if message["role"] == "tool":
            error = _text_error(message["content"])
            if error is not None:
                message["content"] = rng.choice(["Error: ", "error: "]) + error
    ending = rng.random()
    if ending < 0.4:  # the user says goodbye after the answer
        messages.append({"role": "user", "content": "Thanks, that is all. Bye!"})
    elif ending < 0.6:  # a hand-off tool closes the conversation
        call_id = f"call_handoff_{rng.randint(0, 10**6)}"
        customer = {"customer_id": "C-0001"}
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "get_customer", "arguments": json.dumps(customer)},
                    }
                ],
            }
        )
        messages.append(
            {"role": "tool", "tool_call_id": call_id, "content": '{"handed_off": true}'}
        )
    out["messages"] = messages
    out["steps"] = sum(1 for m in messages if m["role"] == "assistant")
    if zeros:  # what `mapping.defaults` filled in before: placeholders, not usage
        out["usage"] = {"prompt_tokens": 0, "completion_tokens": 0}
        out["cost_usd"] = 0.0
    return out


def foreign_runs(
    n: int = 120, seed: int = 5, zeros: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(foreign records, the simulator's own records they came from), corrupt lines left out."""
    params = parse_params({"simulate": {"n_trajectories": n, "seed": seed}})
    rng = random.Random(seed)
    ours = [r for _, r, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate) if r]
    return [foreignise(r, rng, zeros) for r in ours], ours


def long_session(
    episodes: list[dict[str, Any]], policy: str, goodbye: bool = True
) -> list[dict[str, Any]]:
    """One long conversation: a policy as system prompt, then the user's requests one after the
    other (each episode's user turn, tool calls and answer), ending with the user's goodbye."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": policy}]
    for k, episode in enumerate(episodes):
        for message in episode["messages"]:
            if message["role"] == "system":
                continue
            message = json.loads(json.dumps(message))
            for call in message.get("tool_calls") or ():
                call["id"] = f"s{k}_{call['id']}"
            if message.get("tool_call_id"):
                message["tool_call_id"] = f"s{k}_{message['tool_call_id']}"
            messages.append(message)
    if goodbye:
        messages.append({"role": "user", "content": "Thanks, that is all. Bye!"})
    return messages
