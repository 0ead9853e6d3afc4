"""RLVR: GRPO from the SFT model, with our rollout engine feeding TRL's `GRPOTrainer`.

Why `rollout_func` and our engine rather than TRL's `tools=` / `environment_factory=` loop
(docs/training.md has the measurements):

- **what is rewarded is what is measured**: episodes run through the same parser, format
  feedback, `Environment.step` (schema-validated calls, step cap, terminating tools) and
  `Environment.verify_episode` (the whole episode) as evaluation does. TRL's loop has its own
  parser, turns a malformed call into the final answer, passes tool results through `str()`,
  and derives tool schemas from Python signatures (which must then equal the schemas the SFT
  data rendered, or tool calling stops: STACK.md). Any environment behind
  `environment.class_path`, with any JSON schema, works unchanged;
- **speed**: the engine decodes every active episode of the batch in one KV-cached loop that
  stores the shared system prompt + tool schemas once (`tracetune.agent.decoding`); TRL's
  default path calls `model.generate` per tool round (bench/bench_grpo.py);
- **token-in, token-out**: `TracePolicy` extends each episode's context with the tokens the
  model sampled plus the tokenised tool results, never re-rendering what the model wrote, so
  the log-probabilities TRL trains on are those of the tokens that were really sampled.
  Tool-result and feedback tokens are masked out of the loss (`env_mask`);
- **per-call credit**: `GRPOTrainer` takes (B, T) advantages from subclasses; ours adds each
  tool call's centred credit to the tokens of its turn (ToolPO-style, `rlvr.rewards`).

The pieces: `TracePolicy` (token traces), `EpisodeRollout` (the `rollout_func`: runs the
episodes, scores them, returns ids, masks, log-probs and the per-episode reward breakdown that
the reward functions read), `train_rlvr` (model, config, resumable trainer, save), and the
recipe's rule (`decide`, `skip_rlvr`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.agent.rollout import (
    EnvFactory,
    EnvPool,
    ModelPolicy,
    RolloutConfig,
    RolloutResult,
    TurnOutput,
    TurnRequest,
    run_rollouts,
)
from tracetune.agent.template import IM_END, render_messages
from tracetune.config import RLVRParams, SplitParams
from tracetune.environments.base import HELDOUT_SPLIT, Environment, Task
from tracetune.training.health import batch_health, health_callback
from tracetune.training.rewards import (
    BATCH_FIELD,
    EPISODE_FIELD,
    centred_turn_credits,
    reward_functions,
    score_groups,
    summarize_episode,
)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SKIPPED_FILE = "SKIPPED"
TASK_ID_KEY = "task_id"  # carried in the prompt message: TRL hands `rollout_func` prompts only


# ---------------------------------------------------------------------------------------------
# The recipe's rule
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """Whether the stage trains, and the sentence that says why (logged, printed, in metrics)."""

    run: bool
    reason: str
    mode: str
    sft_tsr: float | None
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sft_tsr(eval_sft: dict[str, Any] | None) -> float | None:
    """SFT's held-out TSR from `eval_sft.json` (`candidate.tsr`), or None."""
    if not eval_sft:
        return None
    value = (eval_sft.get("candidate") or {}).get("tsr")
    return None if value is None else float(value)


def decide(params: RLVRParams, eval_sft: dict[str, Any] | None) -> Decision:
    """The recipe: RLVR only when SFT falls short on held-out tasks (or as `mode` forces)."""
    tsr = sft_tsr(eval_sft)
    threshold = params.when_sft_tsr_below
    shown = "unknown" if tsr is None else f"{tsr:.3f}"

    def made(run: bool, reason: str) -> Decision:
        return Decision(run, reason, params.mode, tsr, threshold)

    if params.mode == "never":
        return made(False, f"rlvr.mode is 'never' (SFT held-out TSR {shown}): RLVR skipped")
    if params.mode == "always":
        return made(True, f"rlvr.mode is 'always' (SFT held-out TSR {shown}): RLVR runs")
    if tsr is None:
        raise ValueError(
            "rlvr.mode is 'rule' but the SFT evaluation has no candidate.tsr: run `dvc repro "
            "evaluate@sft` first, or set rlvr.mode to 'always' or 'never'"
        )
    if tsr < threshold:
        return made(True, f"SFT held-out TSR {tsr:.3f} < rlvr.when_sft_tsr_below {threshold:.2f}")
    return made(
        False,
        f"SFT held-out TSR {tsr:.3f} >= rlvr.when_sft_tsr_below {threshold:.2f}: RLVR skipped, "
        "the rlvr candidate is the SFT model",
    )


def skip_rlvr(sft_dir: Path, out_dir: Path, decision: Decision) -> Path:
    """Make `out_dir` a real copy of the SFT model plus a `SKIPPED` marker with the reason.

    A copy (symlinks dereferenced), not a link: DVC caches `models/rlvr` as its own out, and
    downstream stages (evaluate@rlvr, register) see a model where they expect one, with the
    marker telling them it is the SFT model.
    """
    from tracetune.outputs import atomic_dir

    payload = decision.as_dict() | {"source": str(sft_dir)}
    with atomic_dir(out_dir) as tmp:  # the old out_dir or the whole copy, never half
        shutil.copytree(sft_dir, tmp, symlinks=False, dirs_exist_ok=True)
        (tmp / SKIPPED_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return out_dir / SKIPPED_FILE


# ---------------------------------------------------------------------------------------------
# Training tasks (never the held-out ones)
# ---------------------------------------------------------------------------------------------
def training_tasks(
    env: Environment,
    n: int,
    seed: int,
    families: Sequence[str] | None,
    heldout_ids: set[str],
    split: SplitParams | None = None,
) -> list[Task]:
    """`n` tasks drawn from the environment by `seed`, none of them held out.

    A task is dropped when its id is in `heldout_ids` (the evaluation set) or when the split
    would hold it out (`split`'s rule, and the environment's declared `test` split), so RLVR
    never trains on what evaluation measures, even for held-out ids that were never logged.
    A fixed task list gives what it has (fewer than `n` when it is short). Families the
    environment does not have are an error naming the ones it has.
    """
    from tracetune.environments.base import declared_splits, draw_tasks
    from tracetune.trajectories.split import is_heldout

    unknown = sorted(set(families or ()) - set(env.families()))
    if unknown:
        raise ValueError(
            f"rlvr.families: {unknown} are not families of {env.name} "
            f"(it has {env.families()}; `all` trains on every family)"
        )
    declared = declared_splits(env)

    def keep(task: Task) -> bool:
        if task.id in heldout_ids:
            return False
        if split is None:
            return declared is None or declared.get(task.id) != HELDOUT_SPLIT
        return not is_heldout(task.id, task.family, split, declared)

    want = n
    for _ in range(6):
        size = int(want * 1.3) + 8
        try:
            drawn = draw_tasks(env, size, seed, families or None)
        except ValueError:  # fewer distinct tasks exist than asked for
            drawn = _largest_draw(env, seed, families, size)
        kept = [t for t in drawn if keep(t)]
        if len(kept) >= n or len(drawn) < size:
            return kept[:n]
        want *= 2
    return kept[:n]


def _largest_draw(
    env: Environment, seed: int, families: Sequence[str] | None, n: int
) -> list[Task]:
    while n > 1:
        n //= 2
        try:
            return env.tasks(n, seed=seed, families=families or None)
        except ValueError:
            continue
    return []


@dataclass
class Screening:
    """What the pre-training screen found, per family (metrics file and MLflow)."""

    episodes_per_task: int
    screened: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    success: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mixed_outcome_tasks(
    tasks: Sequence[Task], outcomes: dict[str, list[bool]], episodes: int
) -> tuple[list[Task], Screening]:
    """The tasks whose screening episodes both succeeded and failed, in their drawn order.

    Why: GRPO's advantage is a reward minus its group's mean; a task the policy always solves
    or always fails gives every episode the same outcome reward, so its group carries (almost)
    no signal. Dropping those before training puts every optimizer step on tasks it can move.
    """
    screened: Counter[str] = Counter()
    wins: Counter[str] = Counter()
    kept_by_family: Counter[str] = Counter()
    kept = []
    for task in tasks:
        results = outcomes.get(task.id, [])
        screened[task.family] += 1
        wins[task.family] += sum(results)
        if any(results) and not all(results):
            kept.append(task)
            kept_by_family[task.family] += 1
    success = {f: round(wins[f] / (n * episodes), 4) for f, n in screened.items()}
    return kept, Screening(episodes, dict(screened), dict(kept_by_family), success)


def screen_tasks(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    env_factory: EnvFactory,
    params: RLVRParams,
) -> tuple[list[Task], Screening]:
    """Sample `params.screen_episodes` episodes per task from the starting policy, as training
    will (same temperature, turn and token limits), and keep the mixed-outcome tasks."""
    started = time.perf_counter()
    k = params.screen_episodes
    repeated = [task for task in tasks for _ in range(k)]
    seed = step_seed(params.seed, -1)  # not a training step's seed: no episode is reused
    config = RolloutConfig(
        max_new_tokens=params.max_new_tokens,
        max_turns=params.max_episode_steps,
        batch_size=params.rollout_batch_size,
        greedy=False,
        temperature=params.temperature,
        seed=seed,
    )
    with eval_mode(model):
        policy = ModelPolicy(
            model,
            tokenizer,
            "rlvr-screen",
            max_new_tokens=config.max_new_tokens,
            greedy=False,
            temperature=config.temperature,
            seed=seed,
        )
        results = run_rollouts(repeated, policy, EnvPool(env_factory), config, progress=True)
    outcomes: dict[str, list[bool]] = {}
    for result in results:
        outcomes.setdefault(result.trajectory.task_id, []).append(bool(result.outcome.success))
    kept, screening = mixed_outcome_tasks(tasks, outcomes, k)
    screening.seconds = round(time.perf_counter() - started, 2)
    return kept, screening


def task_dataset(tasks: Sequence[Task]) -> Dataset:
    """TRL's `train_dataset`: a conversational prompt per task, its id inside the message."""
    from datasets import Dataset

    rows = [
        {"prompt": [{"role": "user", "content": t.goal, TASK_ID_KEY: t.id}], TASK_ID_KEY: t.id}
        for t in tasks
    ]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# Token traces: token-in, token-out multi-turn episodes
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenTrace:
    """One episode as the model saw it: prompt, then model turns and tool/feedback tokens."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: sampled by the model (trained)
    logprobs: list[float] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # per assistant turn

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def add_model(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        start = len(self.completion_ids)
        self.completion_ids += list(ids)
        self.mask += [1] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.turn_spans.append((start, len(self.completion_ids)))

    def add_environment(self, ids: Sequence[int]) -> None:
        self.completion_ids += list(ids)
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def truncated(self, limit: int) -> tuple[TokenTrace, bool]:
        """The trace cut to `limit` completion tokens, and whether it was cut."""
        if len(self.completion_ids) <= limit:
            return self, False
        spans = [(a, min(b, limit)) for a, b in self.turn_spans if a < limit]
        cut = TokenTrace(
            self.prompt_ids,
            self.completion_ids[:limit],
            self.mask[:limit],
            self.logprobs[:limit],
            spans,
        )
        return cut, True


class TracePolicy(ModelPolicy):
    """A `ModelPolicy` whose later-turn prompts are the episode's own tokens plus tool results.

    Turn 0 is encoded from the chat template as usual. From then on the prompt is the previous
    context + the sampled tokens + the tokens of what the environment said (rendered by the
    chat template and cut out after the last assistant turn), so the model is trained on the
    exact sequence it sampled from. Requires a template in which rendering a conversation with
    one more message extends the previous rendering (true for ChatML templates such as ours).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["keep_tokens"] = True
        super().__init__(*args, **kwargs)
        self.traces: dict[int, TokenTrace] = {}
        vocab = self.tokenizer.get_vocab()
        self.im_end_id = vocab.get(IM_END)

    def encode(self, request: TurnRequest) -> list[int]:
        trace = self.traces.get(request.episode)
        if request.turn == 0 or trace is None:
            ids = super().encode(request)
            self.traces[request.episode] = TokenTrace(list(ids))
            return ids
        trace.add_environment(self.environment_ids(request, trace))
        return trace.context

    def environment_ids(self, request: TurnRequest, trace: TokenTrace) -> list[int]:
        """Tokens between the last sampled token and the next generation (tool results etc.)."""
        messages = list(request.messages)
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        head = render_messages(self.tokenizer, messages[: last + 1], request.tools, False)
        full = render_messages(self.tokenizer, messages, request.tools, True)
        if not full.startswith(head):
            raise RuntimeError(
                "the chat template is not prefix-preserving: a later turn re-renders earlier "
                "ones differently, so token-in/token-out rollouts are impossible"
            )
        closing = head[head.rfind(IM_END) + len(IM_END) :] if IM_END in head else ""
        stopped = bool(trace.completion_ids) and trace.completion_ids[-1] == self.im_end_id
        bridge = closing if stopped else IM_END + closing
        text = bridge + full[len(head) :]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        outputs = super().generate(requests)
        for request, output in zip(requests, outputs, strict=True):
            self.traces[request.episode].add_model(output.completion_ids or [], output.logprobs)
        return outputs


# ---------------------------------------------------------------------------------------------
# The rollout function TRL calls
# ---------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int) -> int:
    """A sampling seed per (run seed, optimizer step): a resumed run draws the same episodes."""
    digest = hashlib.sha256(f"rlvr:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Sample without dropout, then give the trainer its training-mode model back."""
    was_training = bool(model.training)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class RolloutStats:
    """Time spent running episodes inside RLVR (the benchmark's numerator)."""

    calls: int = 0
    episodes: int = 0
    seconds: float = 0.0
    model_tokens: int = 0

    @property
    def episodes_per_second(self) -> float:
        return self.episodes / self.seconds if self.seconds else 0.0


class EpisodeRollout:
    """`rollout_func` for `GRPOTrainer`: run, score and tokenise one generation batch.

    TRL passes the batch's prompts (each task repeated `num_generations` times, consecutively)
    and the trainer. We run every episode with the rollout engine, score it from the verifier
    (`tracetune.training.rewards`), and return per episode: `prompt_ids`, `completion_ids`
    (model turns + tool results), `env_mask` (1 on sampled tokens), `logprobs`, and `episode`
    (the reward breakdown, token credits and batch health) which TRL forwards to the reward
    functions.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        env_factory: EnvFactory,
        tasks: Sequence[Task],
        params: RLVRParams,
    ) -> None:
        self.tokenizer = tokenizer
        self.envs = EnvPool(env_factory)  # built once, reset per episode, reused every step
        self.tasks = {t.id: t for t in tasks}
        self.params = params
        self.stats = RolloutStats()
        self.family_success: dict[str, list[int]] = {}

    def task_for(self, prompt: Any) -> Task:
        for message in reversed(prompt if isinstance(prompt, list) else []):
            if isinstance(message, dict) and message.get(TASK_ID_KEY) in self.tasks:
                return self.tasks[message[TASK_ID_KEY]]
        raise KeyError(f"prompt carries no known {TASK_ID_KEY!r}: {str(prompt)[:200]}")

    def rollout_config(self, seed: int) -> RolloutConfig:
        return RolloutConfig(
            max_new_tokens=self.params.max_new_tokens,
            max_turns=self.params.max_episode_steps,
            batch_size=self.params.rollout_batch_size,
            greedy=False,
            temperature=self.params.temperature,
            seed=seed,
        )

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        started = time.perf_counter()
        tasks = [self.task_for(p) for p in prompts]
        group = int(trainer.num_generations)
        check_groups(tasks, group)
        model = trainer.accelerator.unwrap_model(trainer.model)
        seed = step_seed(self.params.seed, int(trainer.state.global_step))
        config = self.rollout_config(seed)
        with eval_mode(model):
            policy = TracePolicy(
                model,
                self.tokenizer,
                "rlvr",
                max_new_tokens=config.max_new_tokens,
                greedy=False,
                temperature=config.temperature,
                seed=config.seed,
            )
            results = run_rollouts(tasks, policy, self.envs, config, progress=False)
        batch = self.package(results, policy.traces, group)
        self.stats.calls += 1
        self.stats.episodes += len(results)
        self.stats.seconds += time.perf_counter() - started
        self.stats.model_tokens += sum(sum(m) for m in batch["env_mask"])
        return batch

    def package(
        self, results: Sequence[RolloutResult], traces: dict[int, TokenTrace], group: int
    ) -> dict[str, Any]:
        """Scores, token credits and TRL's fields for episodes in batch order."""
        summaries = [
            summarize_episode(
                [m.model_dump(exclude_none=True) for m in r.trajectory.messages],
                r.step_errors,
                r.outcome.success,
                r.ended_by,
            )
            for r in results
        ]
        rewards = self.params.rewards
        breakdowns = score_groups(summaries, group, rewards)
        credits = centred_turn_credits(breakdowns, group)
        fields = ("prompt_ids", "completion_ids", "logprobs", "env_mask", EPISODE_FIELD)
        out: dict[str, list[Any]] = {name: [] for name in fields}
        cut_flags, model_tokens = [], []
        for result, breakdown, credit in zip(results, breakdowns, credits, strict=True):
            trace, cut = traces[result.index].truncated(self.params.max_completion_tokens)
            cut_flags.append(cut)
            model_tokens.append(sum(trace.mask))
            out["prompt_ids"].append(trace.prompt_ids)
            out["completion_ids"].append(trace.completion_ids)
            out["logprobs"].append(trace.logprobs)
            out["env_mask"].append(trace.mask)
            spans = [(a, b, credit[t]) for t, (a, b) in enumerate(trace.turn_spans) if t in credit]
            out[EPISODE_FIELD].append(
                {
                    "task_id": result.trajectory.task_id,
                    "family": result.trajectory.family,
                    "success": result.outcome.success,
                    "turns": result.trajectory.steps,
                    "reward": breakdown.as_dict(),
                    "token_credit": spans if rewards.per_call_credit == "token" else [],
                }
            )
            self.family_success.setdefault(result.trajectory.family, []).append(
                int(result.outcome.success)
            )
        health = batch_health(
            summaries, [b.total for b in breakdowns], group, model_tokens, cut_flags
        )
        for episode in out[EPISODE_FIELD]:
            episode[BATCH_FIELD] = health
        return out


def check_groups(tasks: Sequence[Task], group: int) -> None:
    """GRPO's groups must be consecutive runs of one task (TRL's sampler lays them out so)."""
    if len(tasks) % group:
        raise ValueError(f"{len(tasks)} prompts is not a multiple of the group size {group}")
    for start in range(0, len(tasks), group):
        if len({t.id for t in tasks[start : start + group]}) != 1:
            raise ValueError("a GRPO group mixes tasks: TRL's sampler layout changed")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
def add_token_credit(
    advantages: torch.Tensor, width: int, credits: Sequence[Sequence[Sequence[float]]]
) -> torch.Tensor:
    """(B,) sequence advantages -> (B, width), each call's credit added on its turn's tokens."""
    out = advantages.unsqueeze(1).repeat(1, width).clone()
    for row, spans in enumerate(credits):
        for start, end, value in spans:
            a, b = int(start), min(int(end), width)
            if a < b:
                out[row, a:b] += float(value)
    return out


_TRAINER_CLASS: Any = None


def trainer_class() -> Any:
    """`GRPOTrainer` with token-level per-call credit (built on first use: TRL imports slowly)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from trl import GRPOTrainer

    class TracetuneGRPOTrainer(GRPOTrainer):
        """TRL's trainer; only the advantages change, when episodes carry token credits."""

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> Any:
            output = super()._generate_and_score_completions(inputs)
            credits = [(x.get(EPISODE_FIELD) or {}).get("token_credit") or [] for x in inputs]
            if any(credits) and getattr(self.model, "training", False):
                width = int(output["completion_ids"].shape[1])
                output["advantages"] = add_token_credit(output["advantages"], width, credits)
            return output

    _TRAINER_CLASS = TracetuneGRPOTrainer
    return _TRAINER_CLASS


def micro_batches(params: RLVRParams) -> tuple[int, int]:
    """(episodes per loss forward, forwards per optimizer step): one generation batch per step.

    Peak memory in the loss grows with episodes x trace length (attention and vocabulary-wide
    logits kept for backward), so a pretrained model's long traces need smaller forwards; the
    step still sees every episode of its generation batch through gradient accumulation.
    """
    episodes = params.group_size * params.tasks_per_step
    micro = params.train_micro_batch or episodes
    if episodes % micro:
        raise ValueError(
            f"rlvr.train_micro_batch={micro} must divide the episodes per step "
            f"(group_size x tasks_per_step = {episodes})"
        )
    return micro, episodes // micro


def grpo_config(
    params: RLVRParams, output_dir: Path, cuda: bool, report_to: list[str], weights: list[float]
) -> Any:
    """TRL config: one optimizer step per generation batch; bf16 and checkpointing off on CPU."""
    from trl import GRPOConfig

    micro, accumulate = micro_batches(params)
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=params.steps,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=0,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulate,  # TRL then generates once per optimizer step
        num_generations=params.group_size,
        beta=params.beta,
        epsilon=params.epsilon,
        loss_type=params.loss_type,
        scale_rewards=params.scale_rewards,
        temperature=params.temperature,
        max_completion_length=params.max_completion_tokens,
        reward_weights=weights,
        disable_dropout=True,
        bf16=cuda,
        fp16=False,
        activation_checkpointing=params.activation_checkpointing,  # transformers 5's name
        dataloader_pin_memory=cuda,  # pinning on CPU only warns
        logging_steps=1,  # the health callback judges every step
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,
        seed=params.seed,
        data_seed=params.seed,
        report_to=report_to,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
        disable_tqdm=False,
    )


def load_policy(sft_dir: Path, params: RLVRParams) -> tuple[Any, PreTrainedTokenizerBase]:
    """The SFT model to start from: merged weights, or base + the SFT LoRA adapter (trainable).

    With `use_lora` and an SFT adapter, the adapter trains further (TRL keeps a frozen copy as
    the KL reference); with `use_lora` and no adapter, a fresh adapter goes on the merged model
    (disabling it gives the reference). Otherwise the merged model trains in full.
    """
    from tracetune.agent.model import load_model

    adapter = sft_dir / "adapter"
    if params.use_lora and (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        config = json.loads((adapter / "adapter_config.json").read_text())
        base, tokenizer = load_model(config["base_model_name_or_path"])
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=True), tokenizer
    model, tokenizer = load_model(sft_dir / "merged")
    if params.use_lora:
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in params.lora.target_modules if t in names]
        lora = LoraConfig(
            r=params.lora.r,
            lora_alpha=params.lora.alpha,
            lora_dropout=params.lora.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora), tokenizer
    return model, tokenizer


@dataclass
class RLVRResult:
    """What the RLVR stage reports (metrics file and MLflow)."""

    ran: bool
    decision: dict[str, Any]
    steps: int = 0
    seconds: float = 0.0
    train_tasks: int = 0
    families: list[str] = field(default_factory=list)
    episodes: int = 0
    rollout_seconds: float = 0.0
    episodes_per_second: float = 0.0
    seconds_per_step: float = 0.0
    reward_first: float | None = None
    reward_last: float | None = None
    success_first: float | None = None
    success_last: float | None = None
    tool_call_rate_last: float | None = None
    zero_advantage_share_mean: float | None = None
    kl_last: float | None = None
    train_success_by_family: dict[str, float] = field(default_factory=dict)
    stopped_early: str | None = None
    resumed_from: str | None = None
    screening: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        return out


def run_fingerprint(params: RLVRParams, sft_md5: str, tasks: Sequence[Task], env: str) -> str:
    """Identity of a run: checkpoints resume only into the run that wrote them."""
    blob = json.dumps(
        {
            "p": params.model_dump(mode="json"),
            "m": sft_md5,
            "t": hashlib.sha256("\n".join(t.id for t in tasks).encode()).hexdigest(),
            "e": env,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_md5(model_dir: Path) -> str:
    """A content hash of a saved model's files (the data version of what RLVR starts from)."""
    from tracetune.agent.model import content_hash

    return content_hash(model_dir, "md5")


def _window_mean(
    history: Sequence[dict[str, Any]], key: str, last: bool, k: int = 5
) -> float | None:
    values = [float(h[key]) for h in history if h.get(key) is not None]
    if not values:
        return None
    part = values[-k:] if last else values[:k]
    return round(sum(part) / len(part), 4)


def train_rlvr(
    params: RLVRParams,
    sft_dir: Path,
    tasks: Sequence[Task],
    env_factory: EnvFactory,
    out_dir: Path,
    checkpoint_dir: Path,
    decision: Decision,
    env_key: str = "",
    report_to: list[str] | None = None,
    callbacks: Sequence[Any] = (),
    sft_md5: str | None = None,
) -> RLVRResult:
    """GRPO from the SFT model in `sft_dir`; saves `out_dir/merged` (+ `adapter` with LoRA).

    `sft_md5`: the SFT model's `model_md5`, when the caller already has it (hashing a
    pretrained model's weights twice costs seconds per GB).

    A crashed run resumes from the newest checkpoint of the same run (same params, SFT model,
    tasks and environment). A collapse stops training early; the model so far is still saved
    and the reason reported.
    """
    import torch

    from tracetune.console import RLVR_KEYS, compact_trainer_output
    from tracetune.training.memory import bound_heap_for
    from tracetune.training.sft import prepare_checkpoints, save_model, train_or_restore

    started = time.perf_counter()
    model, tokenizer = load_policy(sft_dir, params)
    bound_heap_for(model)  # a long run's RSS tracks use, not fragmentation
    screening = None
    if params.screen_episodes:
        tasks, found = screen_tasks(model, tokenizer, tasks, env_factory, params)
        screening = found.as_dict()
        log.info("RLVR screen: kept %d tasks %s of %s", len(tasks), found.kept, found.screened)
        if not tasks:
            reason = (
                f"screening found no task with both a success and a failure in "
                f"{params.screen_episodes} episodes (success by family: {found.success}): "
                "GRPO would have no signal; the SFT model is kept"
            )
            skipped = replace(decision, run=False, reason=reason)
            skip_rlvr(sft_dir, out_dir, skipped)
            return RLVRResult(
                ran=False,
                decision=skipped.as_dict(),
                seconds=round(time.perf_counter() - started, 2),
                screening=screening,
            )
    model.train()
    rollout = EpisodeRollout(tokenizer, env_factory, tasks, params)
    funcs, weights = reward_functions(params.rewards)
    sft_md5 = sft_md5 or model_md5(sft_dir / "merged")
    run_id = run_fingerprint(params, sft_md5, tasks, env_key)
    resume = prepare_checkpoints(checkpoint_dir, run_id)
    cuda = next(model.parameters()).device.type == "cuda"
    health = health_callback(params.health)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rollout_func.*experimental")
        trainer = trainer_class()(
            model=model,
            reward_funcs=funcs,
            args=grpo_config(params, checkpoint_dir, cuda, report_to or [], weights),
            train_dataset=task_dataset(tasks),
            processing_class=tokenizer,
            callbacks=[health, *callbacks],
            rollout_func=rollout,
        )
    compact_trainer_output(trainer, "rlvr", RLVR_KEYS)  # one short line per shown step
    train_start = time.perf_counter()
    output = train_or_restore(trainer, resume)  # a finished checkpoint: nothing trains
    train_seconds = time.perf_counter() - train_start
    history = [h for h in trainer.state.log_history if "reward" in h]
    final = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(final, "peft_config") and "ref" in final.peft_config:
        final.delete_adapter("ref")  # TRL's frozen KL reference is not part of the result
    save_model(final, tokenizer, out_dir, params.use_lora)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    steps = int(output.global_step)
    stats = rollout.stats
    return RLVRResult(
        ran=True,
        decision=decision.as_dict(),
        steps=steps,
        seconds=round(time.perf_counter() - started, 2),
        train_tasks=len(tasks),
        families=sorted({t.family for t in tasks}),
        episodes=stats.episodes,
        rollout_seconds=round(stats.seconds, 2),
        episodes_per_second=round(stats.episodes_per_second, 3),
        seconds_per_step=round(train_seconds / max(steps, 1), 3),
        reward_first=_window_mean(history, "reward", last=False),
        reward_last=_window_mean(history, "reward", last=True),
        success_first=_window_mean(history, "health/success_rate", last=False),
        success_last=_window_mean(history, "health/success_rate", last=True),
        tool_call_rate_last=_window_mean(history, "health/tool_call_rate", last=True),
        zero_advantage_share_mean=_window_mean(
            history, "health/zero_advantage_share", last=True, k=len(history) or 1
        ),
        kl_last=_window_mean(history, "kl", last=True),
        train_success_by_family={
            f: round(sum(v) / len(v), 4) for f, v in sorted(rollout.family_success.items())
        },
        stopped_early=health.reason,
        resumed_from=resume,
        screening=screening,
        history=history,
    )
