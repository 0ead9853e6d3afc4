"""The rollout engine: many episodes of an agent policy in a tool environment, batched.

Evaluation and RLVR both need the same thing: put a policy (a model, or a scripted oracle) in
front of the environment for many tasks and record what happened in the one `Trajectory` schema
that production logs use, so rollouts can be curated, versioned and compared like logs.

How it runs (continuous batching):

- up to `batch_size` episodes are *active*; each has its own environment instance (an
  `Environment` holds one episode's state), taken from an `EnvPool` and reset per episode;
- every round, each active episode contributes its next assistant turn to one batched call of
  `policy.generate` (episodes at different turns share the batch); then each turn is parsed and
  its tool calls run with `env.step`;
- a turn without a tool call goes to the environment's user (`Environment.user_reply`): a
  reply (a detail the agent asked for, a "yes") is appended as a user message and the episode
  goes on; None ends it, and that turn's text is the final answer (the last assistant text);
- an episode ends at its final answer, when the environment's step cap is hit, when a
  terminating tool (a hand-off) has run, or after `max_turns` assistant turns; its slot is
  refilled from the queue at the next round.

A turn the parser rejects is never an exception: it is a failed step the agent sees (a user
message saying what was malformed) and may recover from. Every failed episode gets one failure
label from `FAILURE_LABELS` (see `failure_label`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tracetune.agent.parsing import ParsedTurn, parse_assistant_output, to_openai_message
from tracetune.config import EnvironmentParams, Pricing
from tracetune.environments.base import (
    ENDED_ANSWER,
    ENDED_STEP_CAP,
    ENDED_TERMINATED,
    ENDED_TURN_CAP,
    AskUser,
    Call,
    Environment,
    EpisodeRecord,
    Grounded,
    Observation,
    Outcome,
    Reply,
    Solver,
    Task,
)
from tracetune.trajectories.episode import observation_payload
from tracetune.trajectories.schema import Trajectory, Usage
from tracetune.trajectories.simulator import cost_usd

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tracetune.agent.decoding import DecodeOutput, PrefixCache, RowCache
    from tracetune.agent.grounding import Grounding, Vocabulary

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
# The result of a call made in the same turn after a terminating tool ended the episode.
NOT_RUN = Observation(json.dumps({"error": "not run: the episode had ended"}), "ended", True)


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
    # Tool -> argument -> rule, for the arguments the environment declares grounded.
    grounded: Mapping[str, Mapping[str, Grounded]] = field(default_factory=dict)


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
    ended_by: str  # "answer" | "terminated" | "step_cap" | "turn_cap"


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------
def turn_seed(seed: int, episode: int, turn: int) -> int:
    """A sampling seed per (run seed, episode, turn): batching never changes what is drawn."""
    digest = hashlib.sha256(f"{seed}:{episode}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class _Prefix:
    """The rendered system turn shared by every prompt, and its token ids."""

    text: str
    ids: list[int]
    splits: bool | None = None  # does tokenizing the rest alone give the same ids? (checked)
    bare: str | None = None  # the system turn rendered without the tools
    # Does rendering the conversation without the tools give the same text after the system
    # turn? None: not yet checked on a conversation with later turns; False: never use it.
    tools_only_in_system: bool | None = None


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
        cpu_threads: int | None = None,
        reuse_cache: bool = True,
        response_prefix: str = "",
        grounding: bool = False,
    ) -> None:
        if decoder not in ("loop", "hf"):
            raise ValueError(f"decoder must be 'loop' or 'hf', not {decoder!r}")
        from tracetune.agent.model import stop_token_ids

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.greedy, self.temperature = max_new_tokens, greedy, temperature
        self.seed, self.decoder, self.keep_tokens = seed, decoder, keep_tokens
        self.stop_ids = stop_token_ids(tokenizer)
        self.cpu_threads = cpu_threads if cpu_threads is not None else auto_cpu_threads(model)
        # Threads for the big forwards (a many-row decode step, a prefill) when threads are auto.
        auto_one = cpu_threads is None and self.cpu_threads == 1
        self.wide_threads = auto_wide_threads() if auto_one else None
        self._contention = CpuContention()
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self._prefixes: dict[str, _Prefix] = {}
        self.reuse_cache = reuse_cache
        # Text every assistant turn is forced to start with (prefilling), e.g. "<tool_call>\n";
        # it counts as output. Empty for honest evaluation.
        self.response_prefix = response_prefix
        # Grounded tool arguments (tracetune.agent.grounding): values the environment declares
        # copied from the conversation are decoded only from the conversation's values.
        self.grounding = grounding
        self._vocab: Vocabulary | None = None
        # Tokens decoded under the grounding mask, and those where it overrode the model's top
        # choice, over this policy's life: how much the runtime, not the model, decided.
        self.grounding_counts = {"constrained": 0, "overridden": 0}
        from tracetune.agent.decoding import PrefixCache

        self._row_caches: dict[int, RowCache] = {}
        self._prefix_cache: PrefixCache = PrefixCache()

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
        """Prompt ids of one turn: the conversation so far plus the generation prompt.

        The system turn with the tool schemas is most of every prompt and never changes: its
        ids are computed once and only the rest of the text is tokenized, when the tokenizer
        splits there (checked once per prefix against tokenizing the whole text).
        """
        prefix = self._prefix_of(request)
        text = self._render(request, prefix) + self.response_prefix
        if prefix is not None and text.startswith(prefix.text) and prefix.splits is not False:
            ids = prefix.ids + self._tokenize(text[len(prefix.text) :])
            if prefix.splits is None:
                prefix.splits = ids == self._tokenize(text)
            if prefix.splits:
                return ids
        return self._tokenize(text)

    def _render(self, request: TurnRequest, prefix: _Prefix | None) -> str:
        """The prompt text of a request (the chat template with the generation prompt).

        Rendering the tool schemas is most of the template's work, and they only enter the
        system turn (already rendered in `prefix`): the rest of the conversation is rendered
        without them and appended. Checked against the full rendering until a conversation
        with later turns has matched; a template that mismatches is always rendered in full.
        """
        from tracetune.agent.template import render_messages

        messages, tools = request.messages, request.tools
        if prefix is None or not tools or prefix.tools_only_in_system is False:
            return render_messages(self.tokenizer, messages, tools, True)
        if prefix.bare is None:
            prefix.bare = render_messages(self.tokenizer, messages[:1], None, False)
        rest = render_messages(self.tokenizer, messages, None, True)
        text = prefix.text + rest[len(prefix.bare) :] if rest.startswith(prefix.bare) else None
        if prefix.tools_only_in_system is None or text is None:
            full = render_messages(self.tokenizer, messages, tools, True)
            if text != full:
                prefix.tools_only_in_system = False
                return full
            if len(messages) > 2:
                prefix.tools_only_in_system = True
        return text

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prefix_of(self, request: TurnRequest) -> _Prefix | None:
        """The rendered system turn (+ tools) of a request, cached by its content."""
        from tracetune.agent.template import render_messages

        first = request.messages[:1]
        if not first or first[0].get("role") != "system":
            return None
        key = json.dumps([first, list(request.tools)], sort_keys=True, default=str)
        if key not in self._prefixes:
            text = render_messages(self.tokenizer, first, request.tools, False)
            self._prefixes = {key: _Prefix(text, self._tokenize(text))}  # keep only the latest
        return self._prefixes[key]

    def shared_prefix_len(self, requests: Sequence[TurnRequest], prompts: list[list[int]]) -> int:
        """Tokens of the system turn (+ tools) when every prompt starts with the same one.

        A fixed boundary rather than the batch's longest common prefix: a row is then computed
        in the same two chunks whether it runs alone or in a batch, which keeps greedy batched
        decoding equal to one-at-a-time decoding.
        """
        prefix = self._prefix_of(requests[0])
        if prefix is None:
            return 0
        n = len(prefix.ids)
        return n if all(len(p) > n and p[:n] == prefix.ids for p in prompts) else 0

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        if not requests:
            return []
        with torch_threads(self.cpu_threads):
            return self._generate(requests)

    def _generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        prompts = [self.encode(r) for r in requests]
        grounding = self._grounding(requests)
        if self.decoder == "hf":
            outputs = self._generate_hf(prompts, grounding)
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
                caches=self._caches_for(requests),
                keep_cache=self.reuse_cache,
                prefix_cache=self._prefix_cache,
                wide_threads=self._wide_threads(),
                constrain=grounding.mask if grounding is not None else None,
            )
            for out in outputs:
                self.grounding_counts["constrained"] += out.constrained
                self.grounding_counts["overridden"] += out.overridden
            self._row_caches = {
                r.episode: o.cache for r, o in zip(requests, outputs, strict=True) if o.cache
            }
        texts = self.tokenizer.batch_decode(
            [o.token_ids for o in outputs], skip_special_tokens=False
        )
        forced = len(self._tokenize(self.response_prefix)) if self.response_prefix else 0
        return [
            TurnOutput(
                text=self.response_prefix + text,
                prompt_tokens=len(prompt) - forced,
                completion_tokens=len(out.token_ids) + forced,
                prompt_ids=prompt if self.keep_tokens else None,
                completion_ids=out.token_ids if self.keep_tokens else None,
                logprobs=out.logprobs if self.keep_tokens else None,
            )
            for prompt, out, text in zip(prompts, outputs, texts, strict=True)
        ]

    def _grounding(self, requests: Sequence[TurnRequest]) -> Grounding | None:
        """The decode loop's grounding hook for this batch (None: grounding off or undeclared)."""
        if not self.grounding or not requests[0].grounded:
            return None
        from tracetune.agent.grounding import Grounding, Vocabulary

        if self._vocab is None:
            self._vocab = Vocabulary.of(self.tokenizer)
        rows = [r.messages for r in requests]
        return Grounding(self._vocab, requests[0].grounded, rows, self.response_prefix)

    def _wide_threads(self) -> int | None:
        """The wide thread count while other processes leave the cores for it (`CpuContention`)."""
        wide = self.wide_threads
        return wide if wide is not None and self._contention.allows(wide) else None

    def _caches_for(self, requests: Sequence[TurnRequest]) -> list[RowCache | None] | None:
        """Each episode's keys/values from its previous turn (none at turn 0).

        Only this round's episodes are kept afterwards: in the engine every active episode is
        in every round, so an absent one has ended; a new rollout call starts clean, as its
        first round is all turn 0 (weights may have changed in between, e.g. a GRPO step; call
        `clear_cache()` after changing weights outside the engine). Reuse is checked token by
        token against the new prompt (`RowCache.usable_for`).
        """
        if not self.reuse_cache:
            return None
        return [self._row_caches.get(r.episode) if r.turn > 0 else None for r in requests]

    def clear_cache(self) -> None:
        """Forget every episode's keys/values (after the weights changed)."""
        self._row_caches = {}
        self._prefix_cache.clear()

    def _generators(self, requests: Sequence[TurnRequest]) -> list[torch.Generator]:
        import torch

        return [
            torch.Generator().manual_seed(turn_seed(self.seed, r.episode, r.turn)) for r in requests
        ]

    def _generate_hf(
        self, prompts: list[list[int]], grounding: Grounding | None = None
    ) -> list[DecodeOutput]:
        """The same turn through `model.generate` (left-padded batch)."""
        import torch
        from transformers import LogitsProcessorList

        from tracetune.agent.decoding import DecodeOutput, _left_pad
        from tracetune.agent.grounding import logits_processor

        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        processors = []
        if grounding is not None:
            processors.append(logits_processor(grounding, ids.shape[1], self.grounding_counts))
        if not self.greedy:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = self.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=not self.greedy,
                temperature=self.temperature if not self.greedy else None,
                top_p=None,
                top_k=None,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList(processors),
            )
        stops = set(self.stop_ids)
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), None)
            results.append(DecodeOutput(row[:cut] if cut else row, cut is not None))
        return results


SMALL_MODEL_PARAMS = 20_000_000


def auto_cpu_threads(model: PreTrainedModel) -> int | None:
    """1 torch thread for a small model on CPU, else None (leave torch's setting alone).

    A decode step of a few rows of the tiny default is many sub-millisecond ops; spreading each
    over threads costs more in synchronisation than it saves, and on a shared 2-core machine a
    thread that waits for a busy core stalls the step (measured: 16 s with 2 threads everywhere
    against 1.5 s with one for the same rollouts). The big forwards of such a model get torch's
    count back (`auto_wide_threads`). Big models keep torch's default throughout.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        return None
    size = sum(p.numel() for p in model.parameters())
    return 1 if size < SMALL_MODEL_PARAMS else None


def auto_wide_threads() -> int | None:
    """torch's own thread count (one per core) for the big forwards of a small model on CPU,
    whose small forwards run on one thread (`auto_cpu_threads`); None on a single core."""
    import torch

    n = torch.get_num_threads()
    return n if n > 1 else None


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU time of the whole machine (busy, in seconds), of this process, and when."""

    machine_busy_s: float
    own_s: float
    at: float


def cpu_sample() -> CpuSample | None:
    """A reading of `/proc/stat` (Linux) and of this process's CPU time; None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return CpuSample((sum(ticks) - idle) / hz, times.user + times.system, time.monotonic())


def others_busy_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores kept busy by other processes between two samples, on average."""
    wall = after.at - before.at
    if wall <= 0:
        return 0.0
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / wall)


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one, e.g. not macOS)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


class CpuContention:
    """Whether the machine has cores to spare for a forward split over `wide` threads.

    A split forward waits for its slowest thread: with one of 2 cores busy elsewhere the wide
    setting made batched rollouts 2.9x slower (4.48 s against 1.57 s on one thread, measured
    2026-11-29), so it is used only while other processes leave enough cores free. Judged from
    the CPU time of the whole machine minus this process's, over the last `WINDOW_S` or more.
    """

    WINDOW_S = 0.5
    FIRST_WINDOW_S = 0.1  # the first judgement (since construction) may come sooner
    SLACK = 0.5  # cores of others' load tolerated (noise, short system tasks)

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or usable_cores()
        self._last = cpu_sample()
        self.others: float | None = None  # cores busy elsewhere, last window (None: unmeasured)

    def allows(self, wide: int) -> bool:
        window = self.WINDOW_S if self.others is not None else self.FIRST_WINDOW_S
        if self._last is None or time.monotonic() - self._last.at >= window:
            now = cpu_sample()  # read /proc/stat once per window, not once per call
            if now is None:
                return True  # no /proc/stat: nothing to judge by, torch's own setting
            if self._last is not None:
                self.others = others_busy_cores(self._last, now)
            self._last = now
        # Until a first window has been measured, the machine counts as busy (one thread).
        return self.others is not None and self.others <= self.cores - wide + self.SLACK


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block (unchanged when None)."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
        self._asked: dict[int, bool] = {}  # did the solver's last turn speak to the user?
        self._finished: set[int] = set()  # episodes whose solver has returned its answer

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        return [self._turn(r) for r in requests]

    def _turn(self, request: TurnRequest) -> TurnOutput:
        episode = request.episode
        try:
            if request.turn == 0:
                self._finished.discard(episode)
            if episode in self._finished:  # the user replied to its final answer
                raise RuntimeError("the solver has already answered")
            if request.turn == 0 or episode not in self._solvers:
                self._solvers[episode] = self.solver_for(request.task)
                step = next(self._solvers[episode])
            elif self._asked.get(episode):
                step = self._solvers[episode].send(Reply(_last_user_text(request.messages)))
            else:
                step = self._solvers[episode].send(_last_payload(request.messages))
            self._asked[episode] = isinstance(step, AskUser)
            if isinstance(step, AskUser):
                text = step.text  # a turn without a tool call: the user answers it
            else:
                payload = {"name": step.name, "arguments": step.arguments}
                text = "<tool_call>\n" + json.dumps(payload) + "\n</tool_call>"
        except StopIteration as stop:
            self._forget(episode)
            self._finished.add(episode)
            text = str(stop.value or "")
        except Exception as exc:  # a solver bug ends its episode, not the rollout
            self._forget(episode)
            text = f"(solver failed: {type(exc).__name__})"
        prompt_chars = sum(len(str(m.get("content") or "")) for m in request.messages)
        return TurnOutput(text, prompt_chars // 4, len(text) // 4 + 1)

    def _forget(self, episode: int) -> None:
        self._solvers.pop(episode, None)
        self._asked.pop(episode, None)


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The latest user message (the reply an `AskUser` receives)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


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


class EnvPool:
    """Environment instances kept for reuse: one per concurrent episode, across rollout calls.

    Building an environment can cost real time (the support desk checks its tool schemas,
    ~50 ms), and RLVR calls the engine once per training step: a pool held by the caller pays
    that once. `reset(task)` gives every episode a clean state, so reuse is safe.
    """

    def __init__(self, factory: EnvFactory) -> None:
        self.factory = factory
        self._free: list[Environment] = []

    def acquire(self) -> Environment:
        return self._free.pop() if self._free else self.factory()

    def release(self, env: Environment) -> None:
        self._free.append(env)

    def warm(self, n: int) -> EnvPool:
        """Build `n` instances now (e.g. before timing a benchmark)."""
        envs = [self.acquire() for _ in range(n)]
        for env in envs:
            self.release(env)
        return self


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
            if ep.ended_by == ENDED_TERMINATED:  # after a hand-off nothing runs; every call
                ep.messages.append(NOT_RUN.as_tool_message(call.id))  # still gets its result
                continue
            obs = ep.env.step(Call(call.name, call.arguments, call.id))
            ep.messages.append(obs.as_tool_message(call.id))
            if obs.error:
                ep.step_errors.append(obs.error)
                failed = True
            if obs.done:
                ep.ended_by = ENDED_STEP_CAP if obs.error else ENDED_TERMINATED
    else:
        ep.messages.append({"role": "assistant", "content": parsed.content})
        ep.final_answer = parsed.content
        reply = ep.env.user_reply(tuple(ep.messages))
        if reply is None:
            ep.ended_by = ENDED_ANSWER
        else:  # the user answers (a detail the agent asked for, a "yes"): the episode goes on
            ep.messages.append({"role": "user", "content": reply})
    ep.turn_failed.append(failed)
    if ep.ended_by is None and len(ep.turns) >= max_turns:
        ep.ended_by = ENDED_TURN_CAP


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
    if ended_by not in (ENDED_ANSWER, ENDED_TERMINATED):
        return STEP_CAP
    if any(e not in AGENT_FAULTS and e != STEP_CAP for e in step_errors):
        return TOOL_ERROR_UNHANDLED
    return WRONG_ANSWER


def finish(ep: _Episode, model_name: str, pricing: Pricing | None, id_prefix: str) -> RolloutResult:
    """Verify the episode and dress it as a `Trajectory` (the production-log schema)."""
    ended_by = ep.ended_by or ENDED_TURN_CAP
    answer = ep.final_answer if ended_by == ENDED_ANSWER else None
    outcome = ep.env.verify_episode(EpisodeRecord(ep.task, tuple(ep.messages), answer, ended_by))
    prompt = sum(t.prompt_tokens for t in ep.turns)
    completion = sum(t.completion_tokens for t in ep.turns)
    steps = sum(1 for m in ep.messages if m["role"] == "assistant")
    trajectory = Trajectory(
        trajectory_id=f"{id_prefix}-{ep.index:06d}",
        task_id=ep.task.id,
        family=ep.task.family,
        timestamp=ep.started,
        model=model_name,
        messages=ep.messages,  # validated into Message
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
    envs: EnvFactory | EnvPool,
    config: RolloutConfig = RolloutConfig(),
    *,
    pricing: Pricing | None = None,
    id_prefix: str | None = None,
    progress: bool = True,
) -> Iterator[RolloutResult]:
    """Run every task once; yield each episode's result as soon as it ends (finish order).

    `envs` is a factory of fresh environments or an `EnvPool` to reuse instances across calls.
    """
    from tqdm.auto import tqdm

    prefix = id_prefix or f"rollout-{policy.name}-s{config.seed}"
    pool = envs if isinstance(envs, EnvPool) else EnvPool(envs)
    queue = deque(enumerate(tasks))
    active: list[_Episode] = []
    tools: list[dict[str, Any]] | None = None
    grounded: dict[str, dict[str, Grounded]] = {}
    bar = tqdm(total=len(tasks), desc=f"rollouts {policy.name}", unit="ep", disable=not progress)
    try:
        while queue or active:
            while queue and len(active) < max(1, config.batch_size):
                index, task = queue.popleft()
                env = pool.acquire()
                if tools is None:
                    tools, grounded = env.tool_schemas(), env.grounded_arguments()
                started = datetime.now(UTC)
                active.append(_Episode(index, task, env, env.reset(task), started))
            requests = [
                TurnRequest(ep.index, len(ep.turns), ep.task, ep.messages, tools or [], grounded)
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
                pool.release(ep.env)
                bar.update(1)
                yield result
            active = still
    finally:
        bar.close()


def run_rollouts(
    tasks: Sequence[Task],
    policy: Policy,
    envs: EnvFactory | EnvPool,
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
            envs,
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
