"""Benchmark: rollout episodes per second, batched against one episode at a time.

    .venv/bin/python bench/bench_rollout.py                       # models/base, 64 tasks
    .venv/bin/python bench/bench_rollout.py --model PATH --tasks 32 --hf

Same tasks, same greedy decoding, same environment, in one run:

- `batched (32)`: the rollout engine with 32 concurrent episodes (continuous batching: a
  finished episode's slot is refilled at the next round);
- `one at a time`: the same engine with `batch_size=1` (the plain reference);
- `--hf`: also the batched engine with `model.generate` as the decoder instead of the
  hand-written KV-cached loop (what the loop saves per step);
- `--plain`: also the plain reference a simple harness would be: `model.generate`, one episode
  at a time, the whole conversation re-encoded every turn.

Model loading, environment construction and a two-episode warm-up of each mode happen before
the clocks start (a rollout job pays them once). The script checks that both modes produced
identical trajectories and prints the ratio of episodes per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any


def _run(
    policy: Any, tasks: list[Any], pool: Any, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    from tracetune.agent.rollout import RolloutConfig, run_rollouts

    config = RolloutConfig(max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                           batch_size=batch, seed=args.seed)  # fmt: skip
    started = time.perf_counter()
    results = run_rollouts(tasks, policy, pool, config, progress=False)
    seconds = time.perf_counter() - started
    turns = sum(len(r.turns) for r in results)
    tokens = sum(r.trajectory.usage.completion_tokens for r in results)
    return {
        "seconds": seconds,
        "episodes_per_s": len(results) / seconds,
        "turns": turns,
        "new_tokens_per_s": tokens / seconds,
        "tsr": sum(r.trajectory.success for r in results) / len(results),
        "trajectories": [
            r.trajectory.model_dump(mode="json", exclude={"timestamp", "latency_s"})
            for r in results
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/base", help="hub id or path")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="task draw and sampling seed")
    parser.add_argument("--hf", action="store_true", help="also time model.generate batched")
    parser.add_argument("--plain", action="store_true", help="also time model.generate alone")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for every mode (default: auto)"
    )
    args = parser.parse_args()

    import torch

    from tracetune.agent.rollout import EnvPool, ModelPolicy, env_factory_from_params
    from tracetune.config import EnvironmentParams
    from tracetune.environments.support_desk import SupportDesk

    policy = ModelPolicy.from_pretrained(args.model, name="bench",
                                         max_new_tokens=args.max_new_tokens)  # fmt: skip
    tasks = SupportDesk().tasks(args.tasks, seed=args.seed)
    pool = EnvPool(env_factory_from_params(EnvironmentParams())).warm(args.batch)
    if args.threads:
        policy.cpu_threads = args.threads
    policy.generate([])  # nothing: imports are done before the clocks start
    # Warm-up, both modes, before the clocks: first-call costs (template compilation, the system
    # turn's tokens, allocator and kernel warm-up) are paid once per job, not per episode, and
    # would otherwise fall on whichever mode runs first.
    _run(policy, tasks[:2], pool, args.batch, args)
    _run(policy, tasks[:2], pool, 1, args)

    rows: dict[str, dict[str, Any]] = {}
    rows[f"batched ({args.batch})"] = _run(policy, tasks, pool, args.batch, args)
    if args.hf:
        policy.decoder = "hf"
        rows[f"batched ({args.batch}), model.generate"] = _run(
            policy, tasks, pool, args.batch, args
        )
        policy.decoder = "loop"
    rows["one at a time"] = _run(policy, tasks, pool, 1, args)
    if args.plain:
        policy.decoder = "hf"
        rows["one at a time, model.generate"] = _run(policy, tasks, pool, 1, args)
        policy.decoder = "loop"

    single = rows["one at a time"]
    batched = rows[f"batched ({args.batch})"]
    identical = batched["trajectories"] == single["trajectories"]
    print(f"model {args.model}: {sum(p.numel() for p in policy.model.parameters()):,} params, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {policy.cpu_threads or torch.get_num_threads()}")  # fmt: skip
    print(f"{args.tasks} tasks, greedy, max_new_tokens {args.max_new_tokens}, "
          f"max_turns {args.max_turns}, TSR {batched['tsr']:.3f}")  # fmt: skip
    print(f"{'mode':<36}{'seconds':>9}{'episodes/s':>12}{'turns':>7}{'new tok/s':>11}")
    for name, row in rows.items():
        print(f"{name:<36}{row['seconds']:>9.2f}{row['episodes_per_s']:>12.2f}"
              f"{row['turns']:>7}{row['new_tokens_per_s']:>11.0f}")  # fmt: skip
    ratio = batched["episodes_per_s"] / single["episodes_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x  (identical trajectories: {identical})")
    if args.hf:
        hf = rows[f"batched ({args.batch}), model.generate"]
        print(f"decode loop / model.generate (batched): "
              f"{batched['episodes_per_s'] / hf['episodes_per_s']:.2f}x  "
              f"(identical: {hf['trajectories'] == batched['trajectories']})")  # fmt: skip
    if args.plain:
        plain = rows["one at a time, model.generate"]
        print(
            f"batched / plain reference (model.generate, one at a time): "
            f"{batched['episodes_per_s'] / plain['episodes_per_s']:.2f}x  "
            f"(identical: {plain['trajectories'] == batched['trajectories']})"
        )
    if args.json:
        figures = {k: {f: v for f, v in r.items() if f != "trajectories"} for k, r in rows.items()}
        args.json.write_text(
            json.dumps({"ratio": ratio, "identical": identical, **figures}, indent=2)
        )


if __name__ == "__main__":
    main()
