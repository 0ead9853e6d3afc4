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
the clocks start (a rollout job pays them once). The modes take turns `--repeat` times (3) and
each mode's median run is reported, with every run's time beside it. The script checks that
every run of both modes produced identical trajectories and prints the ratio of episodes per
second. Threads are the engine's auto setting unless `--threads N` forces N everywhere.
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


def _median(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median duration (its own figures, so they stay consistent)."""
    return sorted(found, key=lambda r: r["seconds"])[len(found) // 2]


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
        "--threads",
        type=int,
        default=None,
        help="torch threads for every forward of every mode (default: auto, see docs)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs per mode, interleaved; medians reported"
    )
    args = parser.parse_args()

    import torch

    from tracetune.agent.decoding import WIDE_TOKENS
    from tracetune.agent.rollout import EnvPool, ModelPolicy, env_factory_from_params
    from tracetune.config import EnvironmentParams
    from tracetune.environments.support_desk import SupportDesk

    policy = ModelPolicy.from_pretrained(args.model, name="bench", cpu_threads=args.threads,
                                         max_new_tokens=args.max_new_tokens)  # fmt: skip
    tasks = SupportDesk().tasks(args.tasks, seed=args.seed)
    pool = EnvPool(env_factory_from_params(EnvironmentParams())).warm(args.batch)
    policy.generate([])  # nothing: imports are done before the clocks start
    # Warm-up, both modes, before the clocks: first-call costs (template compilation, the system
    # turn's tokens, allocator and kernel warm-up) are paid once per job, not per episode, and
    # would otherwise fall on whichever mode runs first.
    _run(policy, tasks[:2], pool, args.batch, args)
    _run(policy, tasks[:2], pool, 1, args)

    modes: dict[str, tuple[str, int]] = {f"batched ({args.batch})": ("loop", args.batch)}
    if args.hf:
        modes[f"batched ({args.batch}), model.generate"] = ("hf", args.batch)
    modes["one at a time"] = ("loop", 1)
    if args.plain:
        modes["one at a time, model.generate"] = ("hf", 1)
    # The modes take turns, `--repeat` rounds: a slow spell of a shared machine then falls on
    # every mode alike, and each mode's median run is the figure.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for _ in range(max(1, args.repeat)):
        for name, (decoder, batch) in modes.items():
            policy.decoder = decoder
            runs[name].append(_run(policy, tasks, pool, batch, args))
    policy.decoder = "loop"
    rows = {name: _median(found) for name, found in runs.items()}

    single = rows["one at a time"]
    batched = rows[f"batched ({args.batch})"]
    identical = all(  # every run of both modes
        r["trajectories"] == single["trajectories"]
        for name in (f"batched ({args.batch})", "one at a time")
        for r in runs[name]
    )
    print(f"model {args.model}: {sum(p.numel() for p in policy.model.parameters()):,} params, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {policy.cpu_threads or torch.get_num_threads()}"
          + (f" ({policy.wide_threads} for forwards over {WIDE_TOKENS}+ tokens)"
             if policy.wide_threads else ""))  # fmt: skip
    print(f"{args.tasks} tasks, greedy, max_new_tokens {args.max_new_tokens}, "
          f"max_turns {args.max_turns}, TSR {batched['tsr']:.3f}")  # fmt: skip
    print(f"{'mode (median of ' + str(args.repeat) + ' runs)':<36}{'seconds':>9}{'episodes/s':>12}"
          f"{'turns':>7}{'new tok/s':>11}  all runs (s)")  # fmt: skip
    for name, row in rows.items():
        spread = " ".join(f"{r['seconds']:.2f}" for r in runs[name])
        print(f"{name:<36}{row['seconds']:>9.2f}{row['episodes_per_s']:>12.2f}"
              f"{row['turns']:>7}{row['new_tokens_per_s']:>11.0f}  {spread}")  # fmt: skip
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
        for name, found in runs.items():
            figures[name]["all_seconds"] = [r["seconds"] for r in found]
        args.json.write_text(
            json.dumps({"ratio": ratio, "identical": identical, **figures}, indent=2)
        )


if __name__ == "__main__":
    main()
