"""What the evaluate stage runs: held-out tasks, model rollouts, the floor and two baselines.

- **Tasks**: the held-out task ids the split wrote (`heldout_tasks.json`: every held-out task
  of the logs, any outcome, and the environment's declared `test` split), rebuilt in the
  environment (`load_heldout_tasks`, which also resolves PII-pseudonymised ids), capped at
  `evaluate.max_tasks` by taking families in turn so that the cap keeps the family mix. Every
  arm is measured on these tasks.
- **Floor**: doing nothing. A scripted agent whose first message is a final answer that
  declines, no tool called (`do_nothing`). Whatever it scores, the environment gives away:
  tasks whose verifier passes an untouched world. Gains are reported over it too.
- **Candidate / prompt-only baseline**: a model run live through the rollout engine. The
  prompt-only baseline is the base model with the same system prompt and tools, i.e. the
  evaluation of `base`; its rollouts are cached in `reports/eval/base/` under a key of
  everything that shapes them (model content, tasks, decoding settings, environment), so
  evaluating `sft` or `rlvr` reuses them instead of re-running the base model.
- **Production baseline**: what the production agent did on the evaluated tasks, read from
  the ingested logs (logged success, steps, tokens, cost and latency), failed episodes
  included; only episodes of the evaluated tasks count, so the arms compare like with like.
- **Turn limit**: `evaluate.max_turns`, or by default the environment's own
  (`Environment.max_turns`: one turn per allowed call plus the answer); episodes it cut are
  counted in each arm (`cut_by_turn_limit`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracetune.agent.model import model_fingerprint
from tracetune.agent.rollout import (
    EnvPool,
    ModelPolicy,
    RolloutConfig,
    ScriptedPolicy,
    run_rollouts,
)
from tracetune.config import EvaluateParams, Params, Pricing
from tracetune.environments.base import AskUser, Environment, Solver, Task
from tracetune.trajectories.io import read_trajectories
from tracetune.trajectories.schema import Trajectory

ROLLOUTS_FILE = "rollouts.jsonl"
CACHE_FILE = "cache.json"
PROMPT_ONLY = "base"  # the model name whose evaluation is the prompt-only baseline
FLOOR = "do-nothing"  # the floor arm's policy name
FLOOR_ANSWER = "I'm sorry, I cannot help with that."
FREE = Pricing(prompt_per_1k=0.0, completion_per_1k=0.0)  # no model runs for the floor


@dataclass(frozen=True)
class HeldoutSet:
    """Evaluation tasks, and the ids the logs know them by (pseudonymised ids differ)."""

    tasks: list[Task]
    log_ids: list[str]
    unresolved: list[str]
    total: int  # held-out tasks before the cap


def interleave_families(pairs: Sequence[tuple[str, Task]], limit: int) -> list[tuple[str, Task]]:
    """At most `limit` pairs, taking the families in turn (order within a family is kept).

    A plain prefix of a family-sorted list would drop whole families under a cap.
    """
    by_family: dict[str, list[tuple[str, Task]]] = defaultdict(list)
    for pair in pairs:
        by_family[pair[1].family].append(pair)
    queues = [by_family[f] for f in sorted(by_family)]
    out: list[tuple[str, Task]] = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out[:limit]


def select_heldout(env: Environment, params: Params) -> HeldoutSet:
    """The held-out tasks of the split, rebuilt in `env`, capped at `evaluate.max_tasks`."""
    from tracetune.trajectories.pii import key_for
    from tracetune.trajectories.split import load_heldout_tasks, read_heldout_tasks

    curated = params.paths.curated_dir
    entries = read_heldout_tasks(curated)["tasks"]
    loaded = load_heldout_tasks(env, curated, params.ingest.pii, key=key_for(params))
    missing = set(loaded.unresolved)
    log_ids = [e["task_id"] for e in entries if e["task_id"] not in missing]
    pairs = list(zip(log_ids, loaded.tasks, strict=True))
    chosen = interleave_families(pairs, params.evaluate.max_tasks)
    return HeldoutSet(
        tasks=[task for _, task in chosen],
        log_ids=[log_id for log_id, _ in chosen],
        unresolved=loaded.unresolved,
        total=len(pairs),
    )


def model_path(params: Params, name: str) -> str:
    """Where model `name` lives: `evaluate.models[name]`, `base_model.name_or_path` for the
    base (its converted checkpoint for a GGUF source), else the SFT / RLVR stage's output
    `paths.models/<name>/merged` (or, when that folder has no `merged`, `paths.models/<name>`
    itself: a model saved there whole)."""
    if name in params.evaluate.models:
        return params.evaluate.models[name]
    if name == PROMPT_ONLY:
        return params.base_model_path()
    merged = params.paths.models / name / "merged"
    return str(merged if merged.is_dir() else params.paths.models / name)


def pricing_for(evaluate: EvaluateParams, name: str) -> Pricing:
    """The per-1k-token prices of model `name` (a missing entry is a params error)."""
    if name not in evaluate.pricing:
        known = ", ".join(sorted(evaluate.pricing)) or "none"
        raise KeyError(f"evaluate.pricing has no entry for model {name!r} (has: {known})")
    return evaluate.pricing[name]


def turn_limit(evaluate: EvaluateParams, env: Environment) -> int:
    """Assistant turns per episode: `evaluate.max_turns`, else the environment's own."""
    return evaluate.max_turns if evaluate.max_turns is not None else env.max_turns


def rollout_config(evaluate: EvaluateParams, max_turns: int | None = None) -> RolloutConfig:
    """`max_turns`: the resolved `turn_limit` (required when `evaluate.max_turns` is null)."""
    turns = max_turns if max_turns is not None else evaluate.max_turns
    if turns is None:
        raise ValueError("evaluate.max_turns is null: pass the environment's turn limit")
    return RolloutConfig(
        max_new_tokens=evaluate.max_new_tokens,
        max_turns=turns,
        batch_size=evaluate.batch_size,
        greedy=evaluate.greedy,
        temperature=evaluate.temperature,
        seed=evaluate.seed,
    )


def cache_key(
    name_or_path: str, tasks: Sequence[Task], params: Params, max_turns: int | None = None
) -> str:
    """Everything that shapes a model's rollouts (batch size does not: rows are independent).
    `max_turns`: the resolved turn limit (default: `evaluate.max_turns` as written)."""
    from tracetune.environments.pseudonymised import serves_pseudonymised

    ev = params.evaluate
    shaping = {
        "model": model_fingerprint(name_or_path),
        "tasks": [t.id for t in tasks],
        "decoding": {
            "max_new_tokens": ev.max_new_tokens,
            "max_turns": max_turns if max_turns is not None else ev.max_turns,
            "greedy": ev.greedy,
            "temperature": ev.temperature if not ev.greedy else None,
            "seed": ev.seed,
            "decoder": ev.decoder,
        },
        "environment": params.environment.model_dump(mode="json"),
        "grounding": grounding_rules(params) if params.environment.grounded_arguments else None,
        "pseudonymised": serves_pseudonymised(params),  # what the model reads (PII at serving)
    }
    raw = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def grounding_rules(params: Params) -> dict[str, dict[str, list[Any]]]:
    """The environment's grounded-argument declarations (code, not params): a change to them
    changes what a model's rollouts do, so cached rollouts must not survive it."""
    from tracetune.agent.rollout import env_factory_from_params

    declared = env_factory_from_params(params.environment)().grounded_arguments()
    return {
        tool: {arg: [rule.pattern, rule.number] for arg, rule in args.items()}
        for tool, args in declared.items()
    }


def run_model(
    name: str,
    name_or_path: str,
    tasks: Sequence[Task],
    params: Params,
    envs: EnvPool,
    progress: bool = True,
    grounding_counts: dict[str, int] | None = None,
    max_turns: int | None = None,
) -> list[Trajectory]:
    """Load a model and run it on every task; trajectories in task order. `grounding_counts`,
    when given, receives the policy's (tokens decoded under the mask, of them overridden);
    `max_turns`: the resolved `turn_limit`."""
    ev = params.evaluate
    policy = ModelPolicy.from_pretrained(
        name_or_path,
        name=name,
        max_new_tokens=ev.max_new_tokens,
        greedy=ev.greedy,
        temperature=ev.temperature,
        seed=ev.seed,
        decoder=ev.decoder,
        grounding=params.environment.grounded_arguments,
    )
    results = run_rollouts(
        tasks,
        policy,
        envs,
        rollout_config(ev, max_turns),
        pricing=pricing_for(ev, name),
        id_prefix=f"eval-{name}-s{ev.seed}",
        progress=progress,
    )
    if grounding_counts is not None:
        grounding_counts.update(policy.grounding_counts)
    return [r.trajectory for r in results]


def write_rollouts(
    out_dir: Path, trajectories: Sequence[Trajectory], key: str, meta: dict[str, Any]
) -> None:
    """The rollouts (production-log schema) and the cache record that vouches for them."""
    from tracetune.agent.rollout import write_trajectories

    out_dir.mkdir(parents=True, exist_ok=True)
    write_trajectories(out_dir / ROLLOUTS_FILE, trajectories)
    record = {"key": key, "n": len(trajectories), **meta}
    (out_dir / CACHE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_cached_rollouts(out_dir: Path, key: str) -> list[Trajectory] | None:
    """A model's cached rollouts when their key matches, else None (stale or absent)."""
    try:
        record = json.loads((out_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    try:
        trajectories = list(read_trajectories(out_dir / ROLLOUTS_FILE))
    except (OSError, ValueError):
        return None
    return trajectories if len(trajectories) == record.get("n") else None


def do_nothing(task: Task) -> Solver:
    """The floor: every assistant turn declines, no tool is called. Said as a turn to the user
    (`AskUser`), so an environment whose user goes on (a benchmark's next request) gets the
    same decline again, and the last one is the final answer when the user stops."""
    while True:
        yield AskUser(FLOOR_ANSWER)


def run_floor(
    tasks: Sequence[Task], params: Params, envs: EnvPool, max_turns: int
) -> list[Trajectory]:
    """The do-nothing arm on the evaluated tasks, through the same engine and verifier."""
    ev = params.evaluate
    results = run_rollouts(
        tasks,
        ScriptedPolicy(do_nothing, name=FLOOR),
        envs,
        rollout_config(ev, max_turns),
        pricing=FREE,
        id_prefix=f"eval-{FLOOR}",
        progress=False,
    )
    return [r.trajectory for r in results]


def production_baseline(ingested: Path, log_ids: Sequence[str]) -> list[Trajectory]:
    """The production agent's logged episodes of the evaluated tasks, all outcomes.

    `log_ids` are the evaluated tasks as the logs name them (`HeldoutSet.log_ids`: ingest's
    PII-scrubbed ids). Every logged episode of those tasks counts, failed ones included, and
    no other: the arms are compared on the same tasks. The evaluated tasks are every held-out
    task of the logs (not only those that kept a golden episode through curation, which
    would make production's record on them 100% by construction). A session logged twice
    (same task, same messages) counts once.
    """
    if not Path(ingested).exists():
        return []
    wanted = set(log_ids)
    seen: set[str] = set()
    out: list[Trajectory] = []
    for t in read_trajectories(ingested):
        if t.task_id not in wanted:
            continue
        messages = json.dumps([m.model_dump(mode="json") for m in t.messages], sort_keys=True)
        digest = hashlib.sha256(f"{t.task_id}\n{messages}".encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(t)
    return out
