"""What the evaluate stage runs: held-out tasks, model rollouts, and the two baselines.

- **Tasks**: the held-out task ids the split wrote (`heldout_tasks.json`), rebuilt in the
  environment (`load_heldout_tasks`, which also resolves PII-pseudonymised ids), capped at
  `evaluate.max_tasks` by taking families in turn so that the cap keeps the family mix.
- **Candidate / prompt-only baseline**: a model run live through the rollout engine. The
  prompt-only baseline is the base model with the same system prompt and tools, i.e. the
  evaluation of `base`; its rollouts are cached in `reports/eval/base/` under a key of
  everything that shapes them (model content, tasks, decoding settings, environment), so
  evaluating `sft` or `rlvr` reuses them instead of re-running the base model.
- **Production baseline**: what the production agent did on the held-out tasks, read from the
  ingested logs (logged success, steps, tokens, cost and latency), failed episodes included
  (see `production_baseline` for why it selects by the split rule).
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
from tracetune.agent.rollout import EnvPool, ModelPolicy, RolloutConfig, run_rollouts
from tracetune.config import EvaluateParams, Params, Pricing, SplitParams
from tracetune.environments.base import Environment, Task
from tracetune.trajectories.io import read_trajectories
from tracetune.trajectories.schema import Trajectory

ROLLOUTS_FILE = "rollouts.jsonl"
CACHE_FILE = "cache.json"
PROMPT_ONLY = "base"  # the model name whose evaluation is the prompt-only baseline


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
    from tracetune.trajectories.split import load_heldout_tasks, read_heldout_tasks

    curated = params.paths.curated_dir
    entries = read_heldout_tasks(curated)["tasks"]
    loaded = load_heldout_tasks(env, curated, params.ingest.pii)
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
    base (its converted checkpoint for a GGUF source), else `paths.models/<name>` (the SFT and
    RLVR stages' outputs)."""
    if name in params.evaluate.models:
        return params.evaluate.models[name]
    if name == PROMPT_ONLY:
        return params.base_model_path()
    return str(params.paths.models / name)


def pricing_for(evaluate: EvaluateParams, name: str) -> Pricing:
    """The per-1k-token prices of model `name` (a missing entry is a params error)."""
    if name not in evaluate.pricing:
        known = ", ".join(sorted(evaluate.pricing)) or "none"
        raise KeyError(f"evaluate.pricing has no entry for model {name!r} (has: {known})")
    return evaluate.pricing[name]


def rollout_config(evaluate: EvaluateParams) -> RolloutConfig:
    return RolloutConfig(
        max_new_tokens=evaluate.max_new_tokens,
        max_turns=evaluate.max_turns,
        batch_size=evaluate.batch_size,
        greedy=evaluate.greedy,
        temperature=evaluate.temperature,
        seed=evaluate.seed,
    )


def cache_key(name_or_path: str, tasks: Sequence[Task], params: Params) -> str:
    """Everything that shapes a model's rollouts (batch size does not: rows are independent)."""
    ev = params.evaluate
    shaping = {
        "model": model_fingerprint(name_or_path),
        "tasks": [t.id for t in tasks],
        "decoding": {
            "max_new_tokens": ev.max_new_tokens,
            "max_turns": ev.max_turns,
            "greedy": ev.greedy,
            "temperature": ev.temperature if not ev.greedy else None,
            "seed": ev.seed,
            "decoder": ev.decoder,
        },
        "environment": params.environment.model_dump(mode="json"),
        "grounding": grounding_rules(params) if params.environment.grounded_arguments else None,
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
) -> list[Trajectory]:
    """Load a model and run it on every task; trajectories in task order. `grounding_counts`,
    when given, receives the policy's (tokens decoded under the mask, of them overridden)."""
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
        rollout_config(ev),
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


def production_baseline(ingested: Path, split: SplitParams) -> list[Trajectory]:
    """The production agent's logged episodes on held-out tasks, all outcomes.

    Selected by the split's own rule (`is_heldout`: a seeded hash of the task id, or a family
    held out whole), not by the ids in `heldout_tasks.json`: those are the tasks that kept a
    golden (successful) episode through curation, so production's record on exactly them is
    100% by construction. The rule selects the same held-out population before curation,
    failed episodes included. Read from the ingested logs (PII-scrubbed ids, as the split saw
    them); a session logged twice (same task, same messages) counts once.
    """
    from tracetune.trajectories.split import is_heldout

    if not Path(ingested).exists():
        return []
    seen: set[str] = set()
    out: list[Trajectory] = []
    for t in read_trajectories(ingested):
        if not is_heldout(t.task_id, t.family, split):
            continue
        messages = json.dumps([m.model_dump(mode="json") for m in t.messages], sort_keys=True)
        digest = hashlib.sha256(f"{t.task_id}\n{messages}".encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(t)
    return out
