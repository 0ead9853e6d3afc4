"""The rollout engine: many episodes of an agent policy in a tool environment, batched.

Evaluation and RLVR both need the same thing: put a policy (a model, or a scripted oracle) in
front of the environment for many tasks and record what happened in the one `Trajectory` schema
that production logs use, so rollouts can be curated, versioned and compared like logs.

How it runs (continuous batching):

- up to `batch_size` episodes are *active*; each has its own environment instance (an
  `Environment` holds one episode's state), created once per slot by `env_factory`;
- every round, each active episode contributes its next assistant turn to one batched call of
  `policy.generate` (episodes at different turns share the batch); then each turn is parsed and
  its tool calls run with `env.step`;
- an episode ends at its final answer, when the environment's step cap is hit, or after
  `max_turns` assistant turns; its slot is refilled from the queue at the next round.

A turn the parser rejects is never an exception: it is a failed step the agent sees (a user
message saying what was malformed) and may recover from. Every failed episode gets one failure
label from `FAILURE_LABELS` (see `failure_label`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tracetune.agent.parsing import ParsedTurn, parse_assistant_output, to_openai_message
from tracetune.config import EnvironmentParams, Pricing
from tracetune.environments.base import Call, Environment, Observation, Outcome, Task
from tracetune.trajectories.episode import observation_payload
from tracetune.trajectories.schema import Trajectory, Usage
from tracetune.trajectories.simulator import cost_usd

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tracetune.agent.decoding import DecodeOutput

EnvFactory = Callable[[], Environment]

# Failure taxonomy: the label of a failed episode (success episodes have none).
BAD_FORMAT = "bad_format"
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"
WRONG_ANSWER = "wrong_answer"
STEP_CAP = "step_cap"
TOOL_ERROR_UNHANDLED = "tool_error_unhandled"
FAILURE_LABELS = (BAD_FORMAT, UNKNOWN_TOOL, BAD_ARGUMENTS, WRONG_ANSWER, STEP_CAP,
                  TOOL_ERROR_UNHANDLED)  # fmt: skip
# Step errors that are the agent's own fault (vs. tool errors a task may expect, e.g. not found).
AGENT_FAULTS = (BAD_FORMAT, UNKNOWN_TOOL, BAD_ARGUMENTS)
FORMAT_FEEDBACK = "Your last message could not be parsed"


@dataclass(frozen=True)
class RolloutConfig:
    """How episodes are run. `seed` drives sampling (per episode and turn, see `turn_seed`)."""

    max_new_tokens: int = 128
    max_turns: int = 10
    batch_size: int = 32
    greedy: bool = True
    temperature: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class TurnRequest:
    """What a policy needs to produce one assistant turn of one episode."""

    episode: int  # index of the episode in this rollout call: stable, seeds sampling
    turn: int  # 0-based assistant turn
    task: Task
    messages: Sequence[dict[str, Any]]
    tools: Sequence[dict[str, Any]]


@dataclass(frozen=True)
class TurnOutput:
    """One generated assistant turn; token ids/logprobs are kept when the policy is asked to."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    logprobs: list[float] | None = None


class Policy(Protocol):
    """Anything that turns a batch of conversations into next assistant turns."""

    name: str

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]: ...


@dataclass
class RolloutResult:
    """One finished episode: the log-schema record plus what RLVR needs beyond it."""

    index: int  # position of the task in the rollout call
    trajectory: Trajectory
    outcome: Outcome
    turns: list[TurnOutput]
    step_errors: list[str]
    ended_by: str  # "answer" | "step_cap" | "turn_cap"


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------
def turn_seed(seed: int, episode: int, turn: int) -> int:
    """A sampling seed per (run seed, episode, turn): batching never changes what is drawn."""
    digest = hashlib.sha256(f"{seed}:{episode}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class ModelPolicy:
    """A causal LM as the agent: chat-template prompts, one batched KV-cached decode per round.

    `decoder="loop"` uses `tracetune.agent.decoding.decode_batch` (shared-prefix cache,
    per-row seeded sampling; the fast path); `decoder="hf"` uses `model.generate`, kept for
    models whose forward the loop does not fit.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        *,
        max_new_tokens: int = 128,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
        decoder: str = "loop",
        keep_tokens: bool = False,
    ) -> None:
        if decoder not in ("loop", "hf"):
            raise ValueError(f"decoder must be 'loop' or 'hf', not {decoder!r}")
        from tracetune.agent.model import stop_token_ids

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.greedy, self.temperature = max_new_tokens, greedy, temperature
        self.seed, self.decoder, self.keep_tokens = seed, decoder, keep_tokens
        self.stop_ids = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self._prefix_ids: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, name: str | None = None, device: str = "auto", **kwargs: Any
    ) -> ModelPolicy:
        """Load a model by hub id or path (`tracetune.agent.model.load_model`) as a policy."""
        from tracetune.agent.model import load_model

        model, tokenizer = load_model(name_or_path, device=device)
        return cls(model, tokenizer, name or Path(str(name_or_path)).name, **kwargs)

    @classmethod
    def from_config(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        config: RolloutConfig,
        **kwargs: Any,
    ) -> ModelPolicy:
        """A policy whose decoding settings come from a `RolloutConfig`."""
        return cls(
            model,
            tokenizer,
            name,
            max_new_tokens=config.max_new_tokens,
            greedy=config.greedy,
            temperature=config.temperature,
            seed=config.seed,
            **kwargs,
        )

    def encode(self, request: TurnRequest) -> list[int]:
        """Prompt ids of one turn: the conversation so far plus the generation prompt."""
        from tracetune.agent.template import render_messages

        text = render_messages(self.tokenizer, request.messages, request.tools, True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def shared_prefix_len(self, requests: Sequence[TurnRequest], prompts: list[list[int]]) -> int:
        """Tokens of the system turn (+ tools) when every prompt starts with the same one.

        A fixed boundary rather than the batch's longest common prefix: a row is then computed
        in the same two chunks whether it runs alone or in a batch, which keeps greedy batched
        decoding equal to one-at-a-time decoding.
        """
        from tracetune.agent.template import render_messages

        first = requests[0].messages[:1]
        if not first or first[0].get("role") != "system":
            return 0
        key = json.dumps([first, list(requests[0].tools)], sort_keys=True, default=str)
        if key not in self._prefix_ids:
            text = render_messages(self.tokenizer, first, requests[0].tools, False)
            self._prefix_ids = {key: list(self.tokenizer(text, add_special_tokens=False)["input_ids"])}
        prefix = self._prefix_ids[key]
        ok = all(len(p) > len(prefix) and p[: len(prefix)] == prefix for p in prompts)
        return len(prefix) if ok else 0

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        if not requests:
            return []
        prompts = [self.encode(r) for r in requests]
        if self.decoder == "hf":
            outputs = self._generate_hf(prompts)
        else:
            from tracetune.agent.decoding import decode_batch

            outputs = decode_batch(
                self.model,
                prompts,
                max_new_tokens=self.max_new_tokens,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                greedy=self.greedy,
                temperature=self.temperature,
                generators=None if self.greedy else self._generators(requests),
                prefix_len=self.shared_prefix_len(requests, prompts),
                keep_logprobs=self.keep_tokens,
            )
        texts = self.tokenizer.batch_decode(
            [o.token_ids for o in outputs], skip_special_tokens=False
        )
        return [
            TurnOutput(
                text=text,
                prompt_tokens=len(prompt),
                completion_tokens=len(out.token_ids),
                prompt_ids=prompt if self.keep_tokens else None,
                completion_ids=out.token_ids if self.keep_tokens else None,
                logprobs=out.logprobs if self.keep_tokens else None,
            )
            for prompt, out, text in zip(prompts, outputs, texts, strict=True)
        ]

    def _generators(self, requests: Sequence[TurnRequest]) -> list[torch.Generator]:
        import torch

        return [
            torch.Generator().manual_seed(turn_seed(self.seed, r.episode, r.turn))
            for r in requests
        ]

    def _generate_hf(self, prompts: list[list[int]]) -> list[DecodeOutput]:
        """The same turn through `model.generate` (left-padded batch)."""
        import torch

        from tracetune.agent.decoding import DecodeOutput, _left_pad

        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        if not self.greedy:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=not self.greedy,
                temperature=self.temperature if not self.greedy else None,
                top_p=None,
                top_k=None,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
        stops = set(self.stop_ids)
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), None)
            results.append(DecodeOutput(row[:cut] if cut else row, cut is not None))
        return results


Solver = Any  # a generator: yields `Call`s, receives result payloads, returns the answer


class ScriptedPolicy:
    """A scripted solver (e.g. the environment's oracle) as a policy.

    It writes its calls in the same `<tool_call>` text a model writes, so the whole harness
    (parser, environment, verifier, metrics) is exercised exactly as for a model: an oracle that
    does not score 100% through it points at a harness bug.
    """

    def __init__(self, solver_for: Callable[[Task], Solver], name: str = "oracle") -> None:
        self.solver_for = solver_for
        self.name = name
        self._solvers: dict[int, Solver] = {}

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        return [self._turn(r) for r in requests]

    def _turn(self, request: TurnRequest) -> TurnOutput:
        try:
            if request.turn == 0 or request.episode not in self._solvers:
                self._solvers[request.episode] = self.solver_for(request.task)
                call = next(self._solvers[request.episode])
            else:
                call = self._solvers[request.episode].send(_last_payload(request.messages))
            text = "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments})
            text += "\n</tool_call>"
        except StopIteration as stop:
            self._solvers.pop(request.episode, None)
            text = str(stop.value or "")
        except Exception as exc:  # a solver bug ends its episode, not the rollout
            self._solvers.pop(request.episode, None)
            text = f"(solver failed: {type(exc).__name__})"
        prompt_chars = sum(len(str(m.get("content") or "")) for m in request.messages)
        return TurnOutput(text, prompt_chars // 4, len(text) // 4 + 1)


def _last_payload(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The parsed content of the latest tool message (what an oracle solver receives)."""
    for message in reversed(messages):
        if message.get("role") == "tool":
            return observation_payload(Observation(str(message.get("content") or "")))
    return {}


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
@dataclass
class _Episode:
    index: int
    task: Task
    env: Environment
    messages: list[dict[str, Any]]
    started: datetime
    turns: list[TurnOutput] = field(default_factory=list)
    step_errors: list[str] = field(default_factory=list)
    turn_failed: list[bool] = field(default_factory=list)
    final_answer: str | None = None
    ended_by: str | None = None
    latency_s: float = 0.0


def env_factory_from_params(params: EnvironmentParams, max_steps: int | None = None) -> EnvFactory:
    """A factory of fresh environments as params.yaml names them (one per concurrent episode)."""
    from tracetune.environments.base import load_environment

    return functools.partial(
        load_environment,
        params.class_path,
        max_steps=max_steps if max_steps is not None else params.max_steps,
        **params.kwargs,
    )


def format_feedback(error: str) -> str:
    """What the agent is told after a turn the parser rejected."""
    return (
        f"{FORMAT_FEEDBACK} ({error}). Call a tool with <tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        " or reply with your final answer as plain text."
    )


def apply_turn(ep: _Episode, output: TurnOutput, max_turns: int) -> None:
    """Parse one generated turn, run its tool calls, and note whether the episode ended."""
    turn = len(ep.turns)
    ep.turns.append(output)
    parsed: ParsedTurn = parse_assistant_output(output.text, id_prefix=f"call_{turn}")
    failed = False
    if parsed.error is not None:
        ep.messages.append({"role": "assistant", "content": parsed.content})
        ep.messages.append({"role": "user", "content": format_feedback(parsed.error)})
        ep.step_errors.append(BAD_FORMAT)
        failed = True
    elif parsed.tool_calls:
        ep.messages.append(to_openai_message(parsed))
        for call in parsed.tool_calls:
            obs = ep.env.step(Call(call.name, call.arguments, call.id))
            ep.messages.append(obs.as_tool_message(call.id))
            if obs.error:
                ep.step_errors.append(obs.error)
                failed = True
            if obs.done:
                ep.ended_by = STEP_CAP
    else:
        ep.messages.append({"role": "assistant", "content": parsed.content})
        ep.final_answer = parsed.content
        ep.ended_by = "answer"
    ep.turn_failed.append(failed)
    if ep.ended_by is None and len(ep.turns) >= max_turns:
        ep.ended_by = "turn_cap"


def failure_label(success: bool, ended_by: str, step_errors: Sequence[str]) -> str | None:
    """Why an episode failed, by the first thing that went wrong.

    The agent's own first fault (malformed turn, unknown tool, bad arguments) wins; otherwise
    no answer within the caps is `step_cap`; an answer after a tool error it did not handle is
    `tool_error_unhandled`; anything else is a `wrong_answer`.
    """
    if success:
        return None
    first_fault = next((e for e in step_errors if e in AGENT_FAULTS), None)
    if first_fault is not None:
        return first_fault
    if ended_by != "answer":
        return STEP_CAP
    if any(e not in AGENT_FAULTS and e != STEP_CAP for e in step_errors):
        return TOOL_ERROR_UNHANDLED
    return WRONG_ANSWER


def finish(ep: _Episode, model_name: str, pricing: Pricing | None, id_prefix: str) -> RolloutResult:
    """Verify the episode and dress it as a `Trajectory` (the production-log schema)."""
    ended_by = ep.ended_by or "turn_cap"
    answer = ep.final_answer if ended_by == "answer" else None
    outcome = ep.env.verify(answer)
    prompt = sum(t.prompt_tokens for t in ep.turns)
    completion = sum(t.completion_tokens for t in ep.turns)
    steps = sum(1 for m in ep.messages if m["role"] == "assistant")
    trajectory = Trajectory(
        trajectory_id=f"{id_prefix}-{ep.index:06d}",
        task_id=ep.task.id,
        family=ep.task.family,
        timestamp=ep.started,
        model=model_name,
        messages=ep.messages,  # type: ignore[arg-type]  # validated into Message
        success=outcome.success,
        steps=steps,
        error_retries=sum(ep.turn_failed[:-1]),  # failed turns the agent retried after
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        cost_usd=cost_usd(prompt, completion, pricing) if pricing else 0.0,
        latency_s=round(ep.latency_s, 4),
        environment=ep.env.name,
        final_answer=answer,
        failure=failure_label(outcome.success, ended_by, ep.step_errors),
    )
    return RolloutResult(ep.index, trajectory, outcome, ep.turns, ep.step_errors, ended_by)


def iter_rollouts(
    tasks: Sequence[Task],
    policy: Policy,
    env_factory: EnvFactory,
    config: RolloutConfig = RolloutConfig(),
    *,
    pricing: Pricing | None = None,
    id_prefix: str | None = None,
    progress: bool = True,
) -> Iterator[RolloutResult]:
    """Run every task once; yield each episode's result as soon as it ends (finish order)."""
    from tqdm.auto import tqdm

    prefix = id_prefix or f"rollout-{policy.name}-s{config.seed}"
    queue = deque(enumerate(tasks))
    free_envs: list[Environment] = []
    active: list[_Episode] = []
    tools: list[dict[str, Any]] | None = None
    bar = tqdm(total=len(tasks), desc=f"rollouts {policy.name}", unit="ep", disable=not progress)
    try:
        while queue or active:
            while queue and len(active) < max(1, config.batch_size):
                index, task = queue.popleft()
                env = free_envs.pop() if free_envs else env_factory()
                tools = tools or env.tool_schemas()
                started = datetime.now(UTC)
                active.append(_Episode(index, task, env, env.reset(task), started))
            requests = [
                TurnRequest(ep.index, len(ep.turns), ep.task, ep.messages, tools or [])
                for ep in active
            ]
            began = time.perf_counter()
            outputs = policy.generate(requests)
            share = (time.perf_counter() - began) / len(active)
            still: list[_Episode] = []
            for ep, output in zip(active, outputs, strict=True):
                stepped = time.perf_counter()
                apply_turn(ep, output, config.max_turns)
                ep.latency_s += share + time.perf_counter() - stepped
                if ep.ended_by is None:
                    still.append(ep)
                    continue
                result = finish(ep, policy.name, pricing, prefix)
                free_envs.append(ep.env)
                bar.update(1)
                yield result
            active = still
    finally:
        bar.close()


def run_rollouts(
    tasks: Sequence[Task],
    policy: Policy,
    env_factory: EnvFactory,
    config: RolloutConfig = RolloutConfig(),
    *,
    pricing: Pricing | None = None,
    id_prefix: str | None = None,
    progress: bool = True,
    out_path: Path | str | None = None,
) -> list[RolloutResult]:
    """Run every task once; results in task order, optionally written as JSONL trajectories."""
    results = list(
        iter_rollouts(
            tasks,
            policy,
            env_factory,
            config,
            pricing=pricing,
            id_prefix=id_prefix,
            progress=progress,
        )
    )
    results.sort(key=lambda r: r.index)
    if out_path is not None:
        write_trajectories(out_path, [r.trajectory for r in results])
    return results


def write_trajectories(path: Path | str, trajectories: Sequence[Trajectory]) -> Path:
    """JSONL in the production-log schema (written through a temp file, replaced at the end)."""
    from tracetune.trajectories.io import atomic_writer

    path = Path(path)
    with atomic_writer(path) as handle:
        for trajectory in trajectories:
            handle.write(trajectory.to_json() + "\n")
    return path
