"""Benchmark: rollout episodes per second, batched against one episode at a time.

    python bench/bench_rollout.py --model base=models/base --model sft=models/sft/merged --plain
    python bench/bench_rollout.py --model sft=models/sft/merged --threads auto   # engine's tuning

Same tasks, same greedy decoding, same environment, per model, in one run:

- `batched (32)`: the rollout engine with 32 concurrent episodes (continuous batching: a
  finished episode's slot is refilled at the next round);
- `one at a time`: the same engine with `batch_size=1` (the reference of the headline ratio);
- `--plain`: also the plain reference a simple harness would be: `model.generate`, one episode
  at a time, always at torch's default threads (what a plain user gets);
- `--hf`: also the batched engine with `model.generate` as the decoder instead of the
  hand-written KV-cached loop (what the loop saves per step).

Threads (`--threads`), the same for both engine sides and printed for every side:
`default` (the default): torch's own count (one per core, or `OMP_NUM_THREADS`) for every
forward of every mode, no tuning anywhere; `auto`: the engine's automatic rule (one thread for
the small forwards of a small model, torch's count for the big ones while the cores are free:
`auto_cpu_threads`, `_Threads`, `CpuContention`), applied alike to batched and one at a time,
the plain reference still at torch's default; `N`: N threads everywhere.

Model loading, environment construction and a two-episode warm-up of each mode happen before
the clocks start (a rollout job pays them once). The modes take turns `--repeat` times (3) and
each mode's median run is reported with every run's time beside it. The script checks that
every run of the engine's modes produced identical trajectories (token-identical greedy), and
writes bench/results/bench_rollout.json (`bench/_record.py`): one figure per model, episodes/s
batched against one at a time, both sides' settings in words, and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record


def _sig(value: float) -> float:
    """Four significant digits: a slow run's episodes/s keep their ratio (3 decimals did not)."""
    return float(f"{value:.4g}")


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
        "load_1min": round(os.getloadavg()[0], 2),
        "trajectories": [
            r.trajectory.model_dump(mode="json", exclude={"timestamp", "latency_s"})
            for r in results
        ],
    }


def _median(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median duration (its own figures, so they stay consistent)."""
    return sorted(found, key=lambda r: r["seconds"])[len(found) // 2]


def _models(specs: list[str]) -> dict[str, str]:
    """`label=path` (or a bare path, labelled by its folder) -> {label: path}."""
    out: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        out[label] = path
    return out


def _threads_of(setting: str, default: int) -> int | None:
    """The `cpu_threads` a policy gets: torch's count, the engine's auto rule (None), or N."""
    if setting == "default":
        return default
    if setting == "auto":
        return None
    return int(setting)


def _describe(policy: Any, default: int) -> str:
    """A policy's thread settings in words (what the forwards of that side ran with)."""
    if policy.cpu_threads is None:
        return f"torch default ({default} threads) throughout"
    if policy.wide_threads:
        return (f"engine auto: {policy.cpu_threads} thread for forwards under 8 tokens, "
                f"{policy.wide_threads} for bigger ones while other processes leave the cores "
                "free")  # fmt: skip
    if policy.cpu_threads == default:
        return f"torch default ({default} threads) throughout"
    return f"{policy.cpu_threads} threads throughout (torch default {default})"


def bench_model(
    label: str, path: str, args: argparse.Namespace, default_threads: int
) -> tuple[list[Figure], dict[str, Any]]:
    """Every mode of one model, interleaved; its figures and the details of every run."""
    import torch

    from tracetune.agent.model import load_model
    from tracetune.agent.rollout import EnvPool, ModelPolicy, env_factory_from_params
    from tracetune.config import EnvironmentParams
    from tracetune.environments.support_desk import SupportDesk

    model, tokenizer = load_model(path)
    engine_threads = _threads_of(args.threads, default_threads)
    plain_threads = default_threads if args.threads == "auto" else engine_threads

    def policy(threads: int | None, decoder: str = "loop") -> ModelPolicy:
        return ModelPolicy(model, tokenizer, "bench", cpu_threads=threads, decoder=decoder,
                           max_new_tokens=args.max_new_tokens)  # fmt: skip

    batched_name, single_name = f"batched ({args.batch})", "one at a time"
    modes: dict[str, tuple[ModelPolicy, int]] = {batched_name: (policy(engine_threads), args.batch)}
    if args.hf:
        modes[f"batched ({args.batch}), model.generate"] = (
            policy(engine_threads, "hf"),
            args.batch,
        )
    modes[single_name] = (policy(engine_threads), 1)
    if args.plain:
        modes["one at a time, model.generate"] = (policy(plain_threads, "hf"), 1)
    tasks = SupportDesk().tasks(args.tasks, seed=args.seed)
    pool = EnvPool(env_factory_from_params(EnvironmentParams())).warm(args.batch)
    # Warm-up of every mode before the clocks: first-call costs (template compilation, the
    # system turn's tokens, allocator and kernel warm-up) are paid once per job, not per
    # episode, and would otherwise fall on whichever mode runs first.
    for pol, batch in modes.values():
        pol.generate([])
        _run(pol, tasks[:2], pool, batch, args)
    load_before = os.getloadavg()
    # The modes take turns, `--repeat` rounds: a slow spell of a shared machine then falls on
    # every mode alike, and each mode's median run is the figure.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for _ in range(max(1, args.repeat)):
        for name, (pol, batch) in modes.items():
            runs[name].append(_run(pol, tasks, pool, batch, args))
    load_after = os.getloadavg()
    rows = {name: _median(found) for name, found in runs.items()}
    single, batched = rows[single_name], rows[batched_name]
    identical = all(  # every run of both engine modes
        r["trajectories"] == single["trajectories"]
        for name in (batched_name, single_name)
        for r in runs[name]
    )
    settings = {name: _describe(pol, default_threads) for name, (pol, _) in modes.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"\n[{label}] {path}: {params:,} params, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")  # fmt: skip
    print(f"{args.tasks} tasks, greedy, max_new_tokens {args.max_new_tokens}, "
          f"max_turns {args.max_turns}, TSR {batched['tsr']:.3f}")  # fmt: skip
    print(f"{'mode (median of ' + str(args.repeat) + ' runs)':<36}{'seconds':>9}{'episodes/s':>12}"
          f"{'turns':>7}{'new tok/s':>11}  all runs (s)")  # fmt: skip
    for name, row in rows.items():
        spread = " ".join(f"{r['seconds']:.2f}" for r in runs[name])
        print(f"{name:<36}{row['seconds']:>9.2f}{row['episodes_per_s']:>12.2f}"
              f"{row['turns']:>7}{row['new_tokens_per_s']:>11.0f}  {spread}")  # fmt: skip
    for name, words in settings.items():
        print(f"  threads, {name}: {words}")
    ratio = batched["episodes_per_s"] / single["episodes_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x  (identical trajectories: {identical})")

    work = (f"{args.tasks} support-desk tasks (seed {args.seed}), greedy, max_new_tokens "
            f"{args.max_new_tokens}, max_turns {args.max_turns}, "
            f"model {label} ({path})")  # fmt: skip
    load = f"load {load_before[0]:.2f} -> {load_after[0]:.2f}"
    figures = [
        Figure(
            name=f"rollouts, {label} model: batched ({args.batch}) / one at a time",
            value=_sig(batched["episodes_per_s"]),
            unit="episodes/s",
            ours=f"rollout engine, batch {args.batch}, {settings[batched_name]}; {work}",
            reference=f"the same engine, batch 1, {settings[single_name]}; same work",
            reference_value=_sig(single["episodes_per_s"]),
            ratio=round(ratio, 3),
            note=f"median of {args.repeat} interleaved runs; identical trajectories: "
            f"{identical}; {load}",
        )
    ]
    if args.plain:
        plain = rows["one at a time, model.generate"]
        same = plain["trajectories"] == batched["trajectories"]
        figures.append(
            Figure(
                name=f"rollouts, {label} model: batched ({args.batch}) / plain model.generate",
                value=_sig(batched["episodes_per_s"]),
                unit="episodes/s",
                ours=f"rollout engine, batch {args.batch}, {settings[batched_name]}; {work}",
                reference="model.generate, one episode at a time, "
                f"{settings['one at a time, model.generate']}; same work",
                reference_value=_sig(plain["episodes_per_s"]),
                ratio=round(batched["episodes_per_s"] / plain["episodes_per_s"], 3),
                note=f"median of {args.repeat} interleaved runs; identical trajectories: "
                f"{same}; {load}",
            )
        )
    if args.hf:
        hf = rows[f"batched ({args.batch}), model.generate"]
        print(f"decode loop / model.generate (batched): "
              f"{batched['episodes_per_s'] / hf['episodes_per_s']:.2f}x  "
              f"(identical: {hf['trajectories'] == batched['trajectories']})")  # fmt: skip
    details = {
        "path": path,
        "params": params,
        "identical": identical,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "settings": settings,
        "modes": {
            name: {
                **{k: v for k, v in rows[name].items() if k != "trajectories"},
                "all_seconds": [round(r["seconds"], 3) for r in found],
                "all_load_1min": [r["load_1min"] for r in found],
            }
            for name, found in runs.items()
        },
    }
    return figures, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="LABEL=PATH (repeatable; default: base=models/base and "
                             "sft=models/sft/merged, those that exist)")  # fmt: skip
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="task draw and sampling seed")
    parser.add_argument("--hf", action="store_true", help="also time model.generate batched")
    parser.add_argument("--plain", action="store_true", help="also time model.generate alone")
    parser.add_argument("--threads", default="default",
                        help="'default' (torch's count everywhere), 'auto' (the engine's rule "
                             "on both engine sides) or N")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per mode, interleaved; medians reported")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="record path (default: results)")
    args = parser.parse_args()
    if args.threads not in ("default", "auto") and not args.threads.isdigit():
        parser.error("--threads must be 'default', 'auto' or a number")
    specs = args.model or [
        f"{label}={path}"
        for label, path in (("base", "models/base"), ("sft", "models/sft/merged"))
        if Path(path, "config.json").exists()
    ]
    if not specs:
        parser.error("no model: pass --model LABEL=PATH (models/base is built by `dvc repro`)")
    record = start_record("bench_rollout")

    import torch

    default_threads = torch.get_num_threads()  # torch's own count, before anyone changes it
    figures: list[Figure] = []
    details: dict[str, Any] = {"threads_setting": args.threads, "torch_default_threads":
                               default_threads, "models": {}}  # fmt: skip
    for label, path in _models(specs).items():
        found, detail = bench_model(label, path, args, default_threads)
        figures += found
        details["models"][label] = detail
    print()
    print_figures(figures)
    print(f"written: {write_record(record, figures, details, args.out)}")


if __name__ == "__main__":
    main()
