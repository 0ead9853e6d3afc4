"""Production-log simulator: a noisy prompt-only agent whose episodes become JSONL logs.

It plays the environment's oracle (`Environment.oracle`) through the real environment and
injects the faults production agents show (wrong tools, malformed JSON, error retries, redundant
calls, runaway loops, early and wrong answers, duplicated sessions, PII, corrupt lines) at the
rates in params. Success is what the environment verifies, never what the fault schedule
intended, so the logged TSR is the production baseline. Any environment with an oracle works;
one without raises `NoOracleError`. A fixed task list is visited in repeated seeded passes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tracetune.config import Pricing, SimulateParams
from tracetune.environments.base import (
    AskUser,
    Call,
    Environment,
    Reply,
    Solver,
    Task,
    draw_tasks,
)
from tracetune.trajectories.episode import ScriptedEpisode, UserKeptTalking, run_scripted

FAULTS = (
    "wrong_tool",
    "malformed_arguments",
    "error_retry",
    "redundant_call",
    "overlong",
    "wrong_answer",
    "duplicate_session",
    "pii_in_user_text",
    "corrupt_line",
)
# Drawn only when its rate is above 0, after the others, so that adding it left every
# existing simulated batch as it was: the agent answers after only some of the oracle's calls.
EARLY_ANSWER = "early_answer"
# Likewise: where the oracle asks the user (`AskUser`), the agent does not wait for the answer.
SKIP_USER_TURN = "skip_user_turn"
# The most later user turns an early-answering agent answers (a bound on a user who never stops).
EARLY_ANSWER_TURNS = 50
ALL_FAULTS = (*FAULTS, EARLY_ANSWER, SKIP_USER_TURN)
GIVE_UP = "Sorry, I could not complete that request."
TOKENS_PER_CHAR = 0.25


@dataclass
class SimSummary:
    """What the simulated production agent did: the baseline the fine-tuned model must beat."""

    lines: int = 0
    trajectories: int = 0
    readable: int = 0
    corrupt_lines: int = 0
    successes: int = 0
    steps: int = 0
    cost_usd: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    family_total: Counter[str] = field(default_factory=Counter)
    family_success: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        n = max(self.readable, 1)
        return {
            "lines": self.lines,
            "trajectories": self.trajectories,
            "corrupt_lines": self.corrupt_lines,
            "tsr": round(self.successes / n, 4),
            "steps_per_task": round(self.steps / n, 3),
            "cost_per_task_usd": round(self.cost_usd / n, 6),
            "fault_rates": {f: round(self.faults[f] / n, 4) for f in ALL_FAULTS},
            "tsr_per_family": {
                fam: round(self.family_success[fam] / total, 4)
                for fam, total in sorted(self.family_total.items())
            },
            "files": self.files,
        }


def _faulty_hook(rng: random.Random, faults: set[str], env: Environment) -> Any:
    """Calls to insert before the k-th real call, given the faults drawn for this episode."""
    state: dict[str, Call | None] = {"previous": None}
    read_only = env.read_only_tools()

    def hook(call: Call, k: int) -> list[Call]:
        extra: list[Call] = []
        first = k == 0
        if first and "wrong_tool" in faults:
            wrong = rng.choice([n for n in env.tool_names() if n != call.name] + ["lookup_record"])
            extra.append(Call(wrong, call.arguments))
        if first and "malformed_arguments" in faults:
            text = json.dumps(call.arguments)
            extra.append(Call(call.name, text[: max(1, len(text) - rng.randint(2, 6))]))
        if first and "error_retry" in faults:
            extra.append(Call(call.name, _corrupt_ids(call.arguments)))
        if call.name in read_only:
            previous = state["previous"]
            if "redundant_call" in faults and previous is not None:
                extra.append(dataclasses.replace(previous))
            if "overlong" in faults and first:
                extra += [dataclasses.replace(call) for _ in range(rng.randint(14, 17))]
        if call.name in read_only:
            state["previous"] = call
        return extra

    return hook


def _corrupt_ids(arguments: str | dict[str, Any]) -> dict[str, Any]:
    args = dict(arguments) if isinstance(arguments, dict) else {}
    for key, value in args.items():
        if isinstance(value, str):
            args[key] = value.lower().replace("-", "") + "x"
            break
        if isinstance(value, int | float):
            args[key] = str(value)
            break
    return args


def _wrong(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: another status/tier word, or a shifted amount."""
    for a, b in (
        ("shipped", "delivered"),
        ("delivered", "pending"),
        ("pending", "shipped"),
        ("gold", "silver"),
        ("silver", "bronze"),
        ("bronze", "gold"),
        ("not found", "pending"),
        ("cancelled", "still pending"),
        ("30 days", "14 days"),
        ("5 business days", "2 business days"),
        ("2 years", "1 year"),
        ("9:00-17:00", "8:00-20:00"),
        ("over 50", "over 100"),
    ):
        if a in answer:
            return answer.replace(a, b, 1)
    parts = answer.rsplit(" ", 2)
    try:
        value = float(parts[-2].rstrip(":"))
    except (IndexError, ValueError):
        return GIVE_UP
    parts[-2] = f"{value * rng.choice((0.9, 1.1, 1.25)):.2f}"
    return " ".join(parts)


def _pii_sentence(rng: random.Random) -> str:
    user = f"{rng.choice(('sam', 'alex', 'kim', 'li', 'maria'))}{rng.randint(10, 999)}"
    phone = f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    return f" You can reach me at {user}@mailbox.org or {phone}."


def _usage(messages: list[dict[str, Any]], tools_chars: int) -> tuple[int, int]:
    """Token usage as an API bills it: every assistant turn pays for the whole context."""
    prompt = completion = 0
    context = tools_chars
    for m in messages:
        text = (m.get("content") or "") + json.dumps(m.get("tool_calls") or "")
        if m["role"] == "assistant":
            prompt += int(context * TOKENS_PER_CHAR)
            completion += int(len(text) * TOKENS_PER_CHAR) + 1
        context += len(text)
    return prompt, completion


def cost_usd(prompt_tokens: int, completion_tokens: int, pricing: Pricing) -> float:
    return round(
        prompt_tokens / 1000 * pricing.prompt_per_1k
        + completion_tokens / 1000 * pricing.completion_per_1k,
        8,
    )


def _stops_early(solver: Solver, calls: int, answer: str) -> Solver:
    """The oracle's first `calls` calls, then `answer` (the oracle's own, written too soon).

    The answer is said as a turn the user may answer (`AskUser`): a single-turn user ends the
    episode there, as a returned answer would; a user with more to say (a benchmark's next
    request) gets the same answer again, without a call, until it stops."""
    try:
        call = next(solver)
        for _ in range(calls):
            payload = yield call
            call = solver.send(payload)
    except StopIteration:
        pass
    finally:
        solver.close()
    for _ in range(EARLY_ANSWER_TURNS):
        yield AskUser(answer)
    return answer


def _skips_the_user(solver: Solver, env: Environment, task: Task, asked: list[str]) -> Solver:
    """`solver`, except that it never waits for the user: where it would ask (`AskUser`) it
    acts at once on the reply the user would have given, which nobody says (a write without
    the "yes", a lookup of an id nobody told it); where the user would say nothing, its
    question is its answer. Each skipped question is appended to `asked`."""
    try:
        step = next(solver)
        while True:
            if isinstance(step, AskUser):
                asked.append(step.text)
                unsaid = (
                    {"role": "system", "content": env.system_prompt},
                    {"role": "user", "content": task.goal},
                    {"role": "assistant", "content": step.text},
                )
                reply = env.user_reply(unsaid)
                if reply is None:
                    return step.text
                step = solver.send(Reply(reply))
            else:
                payload = yield step
                step = solver.send(payload)
    except StopIteration as stop:
        return str(stop.value)
    finally:
        solver.close()


def _oracle_with_early_answer(
    env: Environment, task: Task, rng: random.Random, faults: set[str]
) -> Callable[[], Solver]:
    """A maker of this episode's oracle: the environment's, or (fault `early_answer`) one that
    answers after a drawn number of its calls; drops the fault when the oracle calls nothing."""
    if EARLY_ANSWER not in faults:
        return lambda: env.require_oracle(task)
    reference = run_scripted(env, task, env.require_oracle(task))
    calls = sum(1 for m in reference.messages if m.get("tool_calls"))
    if not calls:  # an oracle that calls nothing cannot answer earlier
        faults.discard(EARLY_ANSWER)
        return lambda: env.require_oracle(task)
    early = rng.randrange(calls)
    answer = reference.final_answer or ""
    return lambda: _stops_early(env.require_oracle(task), early, answer)


def simulate_episode(
    env: Environment, task: Task, rng: random.Random, params: SimulateParams
) -> tuple[ScriptedEpisode, set[str]]:
    """One logged episode: the oracle with this episode's faults (NoOracleError without one)."""
    rates = params.faults.model_dump()
    faults = {f for f in FAULTS if rng.random() < rates[f]}
    if rates[EARLY_ANSWER] > 0 and rng.random() < rates[EARLY_ANSWER]:
        faults.add(EARLY_ANSWER)
    if rates[SKIP_USER_TURN] > 0 and rng.random() < rates[SKIP_USER_TURN]:
        faults.add(SKIP_USER_TURN)
    if "pii_in_user_text" in faults:
        task = dataclasses.replace(task, goal=task.goal + _pii_sentence(rng))
    gives_up = "malformed_arguments" in faults and rng.random() < 0.3
    oracle = _oracle_with_early_answer(env, task, rng, faults)
    skipped: list[str] = []
    solver = oracle()
    if SKIP_USER_TURN in faults:
        solver = _skips_the_user(solver, env, task, skipped)
    try:
        record = run_scripted(env, task, solver, _faulty_hook(rng, faults, env))
    except UserKeptTalking:
        if SKIP_USER_TURN not in faults:
            raise
        # The environment's user goes on after the skipped turn (its later turns are new
        # requests, as in BFCL multi-turn): this conversation cannot take the fault, so the
        # episode is logged without it (counted as not injected), never dropped or crashed.
        skipped.clear()
        record = run_scripted(env, task, oracle(), _faulty_hook(rng, faults, env))
    if not skipped:  # the agent never had a question to skip (or could not skip it)
        faults.discard(SKIP_USER_TURN)
    if record.ended_by == "answer" and (gives_up or "wrong_answer" in faults):
        answer = GIVE_UP if gives_up else _wrong(record.final_answer or "", rng)
        record.messages[-1] = {"role": "assistant", "content": answer}
        record.final_answer = answer
        record.outcome = env.verify_episode(record.record())
    return record, faults


def to_log_line(
    record: ScriptedEpisode,
    trajectory_id: str,
    when: datetime,
    rng: random.Random,
    params: SimulateParams,
    tools_chars: int,
    environment: str = "support_desk",
) -> dict[str, Any]:
    prompt, completion = _usage(record.messages, tools_chars)
    steps = record.steps
    return {
        "trajectory_id": trajectory_id,
        "task_id": record.task.id,
        "family": record.task.family,
        "timestamp": when.isoformat(),
        "model": params.model_name,
        "messages": record.messages,
        "success": record.outcome.success,
        "steps": steps,
        "error_retries": record.error_retries,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "cost_usd": cost_usd(prompt, completion, params.pricing),
        "latency_s": round(
            sum(rng.lognormvariate(0, 0.4) for _ in range(steps)) * params.mean_latency_s, 3
        ),
        "environment": environment,
        "final_answer": record.final_answer,
    }


def _corrupt(line: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return line[: rng.randint(10, max(11, len(line) // 2))]
    record = json.loads(line)
    record["steps"] = "three"
    return json.dumps(record)


def iter_log_lines(
    env: Environment, params: SimulateParams
) -> Iterator[tuple[str, dict[str, Any] | None, set[str]]]:
    """(line, record or None if corrupt, faults) in arrival order, deterministic for the seed."""
    rng = random.Random(params.seed)
    tasks = draw_tasks(env, params.n_trajectories, params.seed, repeat=True)
    tools_chars = len(json.dumps(env.tool_schemas())) + len(env.system_prompt)
    start = datetime.fromisoformat(params.start_time)
    for i, task in enumerate(tasks):
        record, faults = simulate_episode(env, task, rng, params)
        when = start + timedelta(seconds=i * 17 + rng.randint(0, 9))
        line_obj = to_log_line(
            record, f"tr-{params.seed}-{i:06d}", when, rng, params, tools_chars, env.name
        )
        line = json.dumps(line_obj, ensure_ascii=False)
        if "corrupt_line" in faults:
            yield _corrupt(line, rng), None, faults
            continue
        yield line, line_obj, faults
        if "duplicate_session" in faults:
            dup = dict(line_obj, trajectory_id=line_obj["trajectory_id"] + "-dup")
            dup["timestamp"] = (when + timedelta(seconds=3)).isoformat()
            yield json.dumps(dup, ensure_ascii=False), None, set()


def write_logs(env: Environment, params: SimulateParams, out_dir: Path) -> SimSummary:
    """Write the simulated batch as `params.files` JSONL files under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(params.start_time).strftime("%Y%m%d")
    paths = [out_dir / f"logs-{stamp}-s{params.seed}-{k:02d}.jsonl" for k in range(params.files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    summary = SimSummary(files=[str(p) for p in paths])
    per_file = max(1, -(-params.n_trajectories // params.files))
    try:
        for i, (line, record, faults) in enumerate(iter_log_lines(env, params)):
            handles[min(i // per_file, len(handles) - 1)].write(line + "\n")
            summary.lines += 1
            if "corrupt_line" in faults:
                summary.corrupt_lines += 1
            if record is None and "corrupt_line" not in faults:
                continue  # the duplicate copy of a session
            summary.trajectories += 1
            summary.faults.update(faults)
            if record is not None:
                _tally(summary, record)
    finally:
        for h in handles:
            h.close()
    return summary


def _tally(summary: SimSummary, record: dict[str, Any]) -> None:
    summary.readable += 1
    summary.family_total[record["family"]] += 1
    summary.steps += record["steps"]
    summary.cost_usd += record["cost_usd"]
    if record["success"]:
        summary.successes += 1
        summary.family_success[record["family"]] += 1
