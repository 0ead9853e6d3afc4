"""Benchmark: what grounded tool arguments cost and buy, against free decoding, in one run.

    .venv/bin/python bench/bench_grounding.py --model models/sft/merged   # 200 tasks, 9 families

Same model, same tasks (a seeded draw over every family of the built-in environment), same
greedy decoding and batch, in one run: `free` (the plain reference: no mask) and `grounded`
(the environment's declared arguments decoded from the conversation's values,
`tracetune.agent.grounding`). The modes take turns `--repeat` times (3) after a warm-up of
each, and each mode's median run is reported with every run's time beside it. Printed: seconds,
episodes/s, new tokens/s (the fair speed: the modes write different episodes), TSR, the tokens
decoded under the mask and those where it overrode the model's first choice, and the ratios
grounded / free. Both modes run in one process under the same thread setting: the engine's
automatic policy (one thread for a small model's small forwards, torch's count for the wide
ones), or `--threads N` for every forward; the record (bench/results/bench_grounding.json)
names it.
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

from _record import Figure, print_figures, start_record, write_record
from bench_rollout import _median, _run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/sft/merged", help="hub id or path")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="task draw seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    args = parser.parse_args()
    record = start_record("bench_grounding")

    import torch

    from tracetune.agent.rollout import EnvPool, ModelPolicy, env_factory_from_params
    from tracetune.config import EnvironmentParams
    from tracetune.environments.support_desk import SupportDesk

    policy = ModelPolicy.from_pretrained(args.model, name="bench", grounding=False,
                                         max_new_tokens=args.max_new_tokens,
                                         cpu_threads=args.threads)  # fmt: skip
    tasks = SupportDesk().tasks(args.tasks, seed=args.seed)
    pool = EnvPool(env_factory_from_params(EnvironmentParams())).warm(args.batch)
    for grounding in (False, True):  # warm-up: the vocabulary index is built once per policy
        policy.grounding = grounding
        _run(policy, tasks[:4], pool, args.batch, args)

    runs: dict[str, list[dict[str, Any]]] = {"free": [], "grounded": []}
    counts: dict[str, int] = {}
    for _ in range(max(1, args.repeat)):
        for name in runs:
            policy.grounding = name == "grounded"
            before = dict(policy.grounding_counts)
            runs[name].append(_run(policy, tasks, pool, args.batch, args))
            if policy.grounding:
                counts = {k: v - before[k] for k, v in policy.grounding_counts.items()}
    rows = {name: _median(found) for name, found in runs.items()}

    params = sum(p.numel() for p in policy.model.parameters())
    print(f"model {args.model}: {params:,} params, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{args.tasks} tasks, greedy, batch {args.batch}, max_new_tokens {args.max_new_tokens}")
    print(f"{'mode (median of ' + str(args.repeat) + ' runs)':<30}{'seconds':>9}"
          f"{'episodes/s':>12}{'new tok/s':>11}{'TSR':>7}  all runs (s)")  # fmt: skip
    for name, row in rows.items():
        spread = " ".join(f"{r['seconds']:.2f}" for r in runs[name])
        print(f"{name:<30}{row['seconds']:>9.2f}{row['episodes_per_s']:>12.2f}"
              f"{row['new_tokens_per_s']:>11.0f}{row['tsr']:>7.3f}  {spread}")  # fmt: skip
    free, grounded = rows["free"], rows["grounded"]
    print(
        f"grounded: {counts.get('constrained', 0)} tokens under the mask, "
        f"{counts.get('overridden', 0)} overrode the model's first choice"
    )
    speed = grounded["new_tokens_per_s"] / free["new_tokens_per_s"]
    print(
        f"grounded / free: time {grounded['seconds'] / free['seconds']:.2f}x, "
        f"new tokens/s {speed:.2f}x, TSR {grounded['tsr']:.3f} vs {free['tsr']:.3f}"
    )
    threads = (
        f"torch threads {args.threads} for every forward"
        if args.threads
        else "the engine's thread policy (1 thread for small forwards of a small model, "
        f"torch's {torch.get_num_threads()} for wide ones when the machine has room)"
    )
    common = (
        f"{threads}; {args.model}; {args.tasks} tasks (seed {args.seed}), greedy, batch "
        f"{args.batch}, max_new_tokens {args.max_new_tokens}, max_turns {args.max_turns}"
    )
    ours = f"grounded arguments: {common}"
    ref = f"free decoding (no mask): {common}"
    print(f"\nsettings:\n  grounded: {ours}\n  free: {ref}")
    runs_note = f"median of {args.repeat} interleaved runs"
    figs = [
        Figure(
            name="grounded arguments vs free decoding, new tokens/s",
            value=round(grounded["new_tokens_per_s"], 1),
            unit="new tokens/s",
            ours=ours,
            reference=ref,
            reference_value=round(free["new_tokens_per_s"], 1),
            ratio=round(speed, 2),
            note=f"{runs_note}; the modes write different episodes, so new tokens/s is the "
            f"fair speed; seconds {grounded['seconds']:.2f} vs {free['seconds']:.2f}",
        ),
        Figure(
            name="grounded arguments vs free decoding, TSR on the same tasks",
            value=round(grounded["tsr"], 3),
            unit="TSR",
            ours=ours,
            reference=ref,
            reference_value=round(free["tsr"], 3),
            ratio=round(grounded["tsr"] / free["tsr"], 2) if free["tsr"] else None,
            note=f"{counts.get('constrained', 0)} tokens under the mask, "
            f"{counts.get('overridden', 0)} overrode the model's first choice",
        ),
    ]
    print_figures(figs)
    details = {
        "budget": f"{args.tasks} tasks x {args.repeat} runs per mode",
        "runs": {
            name: [{k: v for k, v in r.items() if k != "trajectories"} for r in found]
            for name, found in runs.items()
        },
    }
    print(f"record: {write_record(record, figs, details)}")


if __name__ == "__main__":
    main()
