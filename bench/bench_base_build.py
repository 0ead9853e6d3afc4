"""Benchmark: the embedded base model's build, the default step budget against a reference one.

    .venv/bin/python bench/bench_base_build.py --ours pretrain_steps=600          # projection
    .venv/bin/python bench/bench_base_build.py --ours pretrain_steps=600 --full   # both builds
    .venv/bin/python bench/bench_base_build.py --threads      # 1 against 2 torch threads
    .venv/bin/python bench/bench_base_build.py --compile      # eager against torch.compile

Both sides are the same code, corpus, tokenizer and per-step work; they differ only in
`base_model.build` (ours: params.yaml with the `--ours` settings, e.g. `--ours
pretrain_steps=600`; the reference: params.yaml with the `--reference` settings, by default
1,200 general steps of batch 4, the shipped default). So the question is how
many tokens each side trains on and what a token costs:

- default mode: replays each side's batch plan exactly (the seeded length batches `pretrain`
  draws, so the counts equal the build report's `tokens_seen`), times `--sample-steps` real
  optimizer steps of each phase (copy drills, whole corpus) in turns, and projects each side's
  pre-training seconds = its tokens per phase x that phase's measured seconds per token. The
  corpus, tokenizer and encoding are timed once (both sides pay them alike);
- `--compile`: the default build only, eager against `torch.compile` of the step's forward +
  loss (`compare_compile`): per-phase seconds per token in turns on equal batches, the compile
  time on a cold inductor cache, the loss gap between the arms, and the build's projection
  with the compile time paid;
- `--full`: builds both models in turn (A B, `--repeat` times) with `build_base_model` and
  reports measured wall seconds, pre-training seconds and the copy probes of each build.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record


def phase_plan(build: Any, n_drills: int) -> list[tuple[str, int, int]]:
    """(phase, steps, batch size) as `pretrain` runs them: copy drills first, then everything."""
    warm = round(build.copy_warmup * build.pretrain_steps) if n_drills else 0
    phases = [("drills", warm, 2 * build.batch_size)] if warm else []
    return [*phases, ("corpus", build.pretrain_steps, build.batch_size)]


def planned_tokens(build: Any, lengths: dict[str, list[int]]) -> dict[str, int]:
    """Padded tokens per phase, replaying `pretrain`'s seeded batch draws exactly."""
    from tracetune.agent.base_model import length_batches

    rng = random.Random(build.seed)
    out: dict[str, int] = {}
    for phase, steps, size in phase_plan(build, len(lengths["drills"])):
        pool = lengths[phase]
        batches: list[list[int]] = []
        total = 0
        for _ in range(steps):
            if not batches:
                batches = length_batches(pool, size, rng)
            batch = batches.pop()
            total += len(batch) * max(pool[i] for i in batch)
        out[phase] = total
    return out


def time_steps(model: Any, pool: list[Any], size: int, steps: int, pad: int, build: Any) -> float:
    """Seconds per token over `steps` real AdamW steps on random length batches of `pool`."""
    import torch

    from tracetune.agent.base_model import collate, length_batches, weighted_lm_loss

    batches = length_batches([len(ids) for ids, _ in pool], size, random.Random(time.time_ns()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.lr, betas=(0.9, 0.95))
    tokens, started = 0, time.perf_counter()
    for _ in range(steps):
        input_ids, labels, real = collate([pool[i] for i in batches.pop()], pad)
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = weighted_lm_loss(logits, input_ids, labels, real, build.prompt_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += input_ids.numel()
    return (time.perf_counter() - started) / tokens


def prepare(build: Any) -> tuple[Any, dict[str, list[Any]], dict[str, float]]:
    """Tokenizer and the two phases' example pools of a build, as `build_base_model` makes them."""
    from transformers import AutoTokenizer

    from tracetune.agent import base_model as bm
    from tracetune.agent.corpus import generate_corpus, is_drill

    fixed: dict[str, float] = {}
    started = time.perf_counter()
    corpus = generate_corpus(build.corpus_size, build.seed)
    rendered = bm.render_corpus(corpus)
    fixed["corpus_and_render_s"] = time.perf_counter() - started
    started = time.perf_counter()
    sample = random.Random(build.seed).sample(rendered, min(bm.TOKENIZER_SAMPLE, len(rendered)))
    with tempfile.TemporaryDirectory() as work:
        texts = [t for t, _ in sample]
        bm.train_tokenizer(texts, build.vocab_size, build.pretokenizer).save_pretrained(work)
        tokenizer = AutoTokenizer.from_pretrained(work)
    fixed["tokenizer_s"] = time.perf_counter() - started
    started = time.perf_counter()
    examples = bm.encode_with_labels(tokenizer, rendered)
    fixed["encode_s"] = time.perf_counter() - started
    pools = {
        "drills": [ex for ex, conv in zip(examples, corpus, strict=True) if is_drill(conv)],
        "corpus": [(ids[: build.seq_len], lab[: build.seq_len]) for ids, lab in examples],
    }
    return tokenizer, pools, fixed


def project(ours: Any, reference: Any, sample_steps: int, repeat: int) -> dict[str, Any]:
    """Token counts of both plans and per-phase seconds per token measured in turns."""
    from tracetune.agent import base_model as bm

    tokenizer, pools, fixed = prepare(ours)
    lengths = {phase: [len(ids) for ids, _ in pool] for phase, pool in pools.items()}
    tokens = {
        "ours": planned_tokens(ours, lengths),
        "reference": planned_tokens(reference, lengths),
    }
    model = bm.new_model(tokenizer, ours)
    pad = int(tokenizer.pad_token_id)
    sides = {"ours": ours, "reference": reference}
    runs: dict[str, list[float]] = {}
    loads: list[float] = []
    time_steps(model, pools["corpus"], ours.batch_size, 2, pad, ours)  # warm-up
    for _ in range(max(1, repeat)):  # each side's batch sizes in turn: s/token depends on batch
        for side, build in sides.items():
            for phase, _, size in phase_plan(build, len(pools["drills"])):
                loads.append(os.getloadavg()[0])
                spent = time_steps(model, pools[phase], size, sample_steps, pad, build)
                runs.setdefault(f"{side}/{phase}", []).append(spent)
    cost = {key: statistics.median(found) for key, found in runs.items()}
    seconds = {
        side: sum(n * cost[f"{side}/{phase}"] for phase, n in plan.items())
        for side, plan in tokens.items()
    }
    return {
        "tokens": tokens,
        "seconds_per_token": cost,
        "seconds_per_token_runs": runs,
        "projected_pretrain_s": seconds,
        "fixed_s": fixed,
        "loads": loads,
    }


def compare_threads(build: Any, sample_steps: int, repeat: int) -> dict[str, Any]:
    """Seconds per token of whole-corpus steps at 1 and at 2 torch threads, in turns.

    Why: on a machine whose other jobs keep both cores busy, two threads wait on each other
    (OpenMP barriers) while a single thread just takes its share; the quiet demo wants two.
    """
    import torch
    from transformers import AutoTokenizer

    from tracetune.agent import base_model as bm
    from tracetune.agent.corpus import generate_corpus

    corpus = generate_corpus(400, build.seed)
    rendered = bm.render_corpus(corpus)
    with tempfile.TemporaryDirectory() as work:
        texts = [t for t, _ in rendered]
        bm.train_tokenizer(texts, build.vocab_size, build.pretokenizer).save_pretrained(work)
        tokenizer = AutoTokenizer.from_pretrained(work)
    pool = [
        (i[: build.seq_len], lab[: build.seq_len])
        for i, lab in bm.encode_with_labels(tokenizer, rendered)
    ]
    model = bm.new_model(tokenizer, build)
    pad = int(tokenizer.pad_token_id)
    runs: dict[str, list[float]] = {"1": [], "2": []}
    loads: list[float] = []
    for _ in range(max(1, repeat)):
        for threads in runs:
            torch.set_num_threads(int(threads))
            loads.append(os.getloadavg()[0])
            runs[threads].append(
                time_steps(model, pool, build.batch_size, sample_steps, pad, build)
            )
    return {"seconds_per_token": runs, "loads": loads}


def lm_loss(model: Any, input_ids: Any, labels: Any, real: Any, prompt_weight: float) -> Any:
    """One pre-training forward and its loss, exactly as `pretrain` computes them."""
    from tracetune.agent.base_model import weighted_lm_loss

    logits = model(input_ids=input_ids, use_cache=False).logits
    return weighted_lm_loss(logits, input_ids, labels, real, prompt_weight)


def run_batches(arm: dict[str, Any], batches: list[Any], build: Any) -> tuple[float, list[float]]:
    """Wall seconds and losses of `pretrain`'s optimizer step on each (ids, labels, real) batch."""
    from tracetune.agent.base_model import update

    model, loss_of, optimizer = arm["model"], arm["loss"], arm["optimizer"]
    losses: list[float] = []
    started = time.perf_counter()
    for input_ids, labels, real in batches:
        loss = loss_of(model, input_ids, labels, real, build.prompt_loss_weight)
        losses.append(update(model, optimizer, loss))
    return time.perf_counter() - started, losses


def compare_compile(build: Any, sample_steps: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Eager against `torch.compile(dynamic=True)` of forward + loss, in turns, on equal batches.

    Both arms start from the same seeded weights and see the same batches in the same order, so
    their losses must agree to fp32 rounding (reported as the largest relative gap). The
    compiled arm's first `warmup` steps per phase, twice, carry its compile time (graph capture,
    AOTAutograd's backward, inductor's C++ build; a cold cache unless TORCHINDUCTOR_CACHE_DIR
    holds one): compile seconds = those steps' wall minus the eager arm's wall on the same batches.
    """
    import torch

    from tracetune.agent import base_model as bm

    tokenizer, pools, fixed = prepare(build)
    lengths = {phase: [len(ids) for ids, _ in pool] for phase, pool in pools.items()}
    tokens = planned_tokens(build, lengths)
    pad = int(tokenizer.pad_token_id)
    arms: dict[str, dict[str, Any]] = {}
    for name, loss_of in (("eager", lm_loss), ("compiled", torch.compile(lm_loss, dynamic=True))):
        model = bm.new_model(tokenizer, build)  # seeded: both arms get the same weights
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=build.lr, betas=(0.9, 0.95), weight_decay=0.01
        )
        arms[name] = {"model": model, "loss": loss_of, "optimizer": optimizer}
    rng = random.Random(build.seed)
    sizes = {phase: size for phase, _, size in phase_plan(build, len(pools["drills"]))}

    def draw(phase: str, n: int) -> list[Any]:
        order = bm.length_batches(lengths[phase], sizes[phase], rng)[:n]
        return [bm.collate([pools[phase][i] for i in batch], pad) for batch in order]

    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    warm: dict[str, float] = {"eager": 0.0, "compiled": 0.0}
    from torch._dynamo.utils import counters

    for phase in [*sizes, *sizes]:  # both phases twice: a phase switch can recompile once more
        batches = draw(phase, warmup)
        for name, arm in arms.items():
            spent, found = run_batches(arm, batches, build)
            warm[name] += spent
            losses[name].extend(found)
    graphs_warm = int(counters["stats"]["unique_graphs"])
    runs: dict[str, list[float]] = {}
    loads: list[float] = []
    for _ in range(max(1, repeat)):
        for phase in sizes:
            batches = draw(phase, sample_steps)
            n_tokens = sum(int(ids.numel()) for ids, _, _ in batches)
            for name, arm in arms.items():
                loads.append(os.getloadavg()[0])
                spent, found = run_batches(arm, batches, build)
                runs.setdefault(f"{name}/{phase}", []).append(spent / n_tokens)
                losses[name].extend(found)
    cost = {key: statistics.median(found) for key, found in runs.items()}
    gaps = [abs(c - e) / abs(e) for e, c in zip(losses["eager"], losses["compiled"], strict=True)]
    seconds = {
        name: sum(n * cost[f"{name}/{phase}"] for phase, n in tokens.items()) for name in arms
    }
    return {
        "tokens": tokens,
        "seconds_per_token": cost,
        "seconds_per_token_runs": runs,
        "projected_pretrain_s": seconds,
        "compile_s": warm["compiled"] - warm["eager"],
        "warmup_s": warm,
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "graphs_compiled_while_timed": int(counters["stats"]["unique_graphs"]) - graphs_warm,
        "losses": losses,
        "max_relative_loss_gap": max(gaps),
        "fixed_s": fixed,
        "loads": loads,
    }


def full_builds(ours: Any, reference: Any, repeat: int) -> dict[str, Any]:
    """Both whole builds in turn: measured seconds, tokens and probe rates of each."""
    from tracetune.agent.base_model import build_base_model

    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
    for _ in range(max(1, repeat)):
        for side, build in (("reference", reference), ("ours", ours)):
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                report = build_base_model(build, Path(work) / "base", progress=False)
                wall = time.perf_counter() - started
            runs[side].append({"wall_s": wall, "load": load, **report.as_dict()})
    return runs


def compile_figures(details: dict[str, Any], words: str, warm_cache: bool) -> list[Figure]:
    """Per-phase seconds per token, compiled against eager, and the whole build's projection."""
    cost, loads = details["seconds_per_token"], details["loads"]
    load = f"load {min(loads):.1f}-{max(loads):.1f}"
    ours = f"{words}; forward + loss under torch.compile(dynamic=True), inductor CPU"
    reference = f"{words}; eager (what `pretrain` runs)"
    figures = []
    for phase in details["tokens"]:
        compiled, eager = cost[f"compiled/{phase}"], cost[f"eager/{phase}"]
        figures.append(Figure(f"pre-training s per 1k tokens, {phase}, compiled",
                              round(compiled * 1e3, 4), "s/1k tokens", ours, reference,
                              round(eager * 1e3, 4), round(compiled / eager, 3), load))  # fmt: skip
    secs, compile_s = details["projected_pretrain_s"], details["compile_s"]
    cache = "torch's inductor cache as found" if warm_cache else "a cold inductor cache"
    figures.append(Figure("projected pre-training time, compiled incl. compile",
                          round(secs["compiled"] + compile_s, 1), "s", ours, reference,
                          round(secs["eager"], 1),
                          round((secs["compiled"] + compile_s) / secs["eager"], 3),
                          f"compile {compile_s:.0f} s ({cache}, {details['graphs_compiled']} "
                          f"graphs, {details['graphs_compiled_while_timed']} of them while "
                          f"timed); loss gap max {details['max_relative_loss_gap']:.1e} "
                          f"relative over {len(details['losses']['eager'])} equal steps; "
                          f"{load}"))  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ours",
        action="append",
        metavar="KEY=VALUE",
        help="a base_model.build setting of the candidate (default: params.yaml)",
    )
    parser.add_argument("--reference", action="append", metavar="KEY=VALUE",
                        help="a base_model.build setting of the reference (default: the settings "
                        "before issue 23, pretrain_steps=1200 batch_size=4)")  # fmt: skip
    parser.add_argument("--sample-steps", type=int, default=8, help="timed steps per phase turn")
    parser.add_argument("--repeat", type=int, default=3, help="turns (projection) or A B builds")
    parser.add_argument("--full", action="store_true", help="build both models in turn")
    parser.add_argument("--threads", action="store_true",
                        help="only 1 against 2 torch threads, whole-corpus steps")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="only eager against torch.compile of the pre-training step (a "
                        "cold inductor cache unless --warm-cache)")  # fmt: skip
    parser.add_argument("--compile-warmup", type=int, default=3,
                        help="untimed steps per phase that carry the compile time")  # fmt: skip
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep torch's own inductor cache (default: a fresh one)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="the record's path (default bench/results/<bench>.json)")  # fmt: skip
    args = parser.parse_args()
    bench = "bench_base_build_threads" if args.threads else "bench_base_build"
    record = start_record("bench_base_build_compile" if args.compile else bench)

    from tracetune.config import Params

    shipped = Params().base_model.build

    def settings(pairs: list[str]) -> Any:
        return type(shipped).model_validate(
            {**shipped.model_dump(), **dict(p.split("=", 1) for p in pairs)}
        )

    ours = settings(args.ours or [])
    reference = settings(args.reference or ["pretrain_steps=1200", "batch_size=4"])
    words = {
        side: f"pretrain_steps {b.pretrain_steps}, copy_warmup {b.copy_warmup}, batch "
        f"{b.batch_size} (drills {2 * b.batch_size}), lr {b.lr}, seq_len {b.seq_len}, corpus "
        f"{b.corpus_size}, torch threads as set (OMP_NUM_THREADS)"
        for side, b in (("ours", ours), ("reference", reference))
    }
    figures: list[Figure] = []
    if args.compile:
        with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cold:
            if not args.warm_cache:  # read by inductor when it first compiles: nothing reused
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
            details = compare_compile(ours, args.sample_steps, args.repeat, args.compile_warmup)
        figures.extend(compile_figures(details, words["ours"], warm_cache=args.warm_cache))
    elif args.threads:
        details = compare_threads(ours, args.sample_steps, args.repeat)
        rate = {k: 1 / statistics.median(v) for k, v in details["seconds_per_token"].items()}
        loads = details["loads"]
        figures.append(Figure("pre-training tokens/s, 1 torch thread", round(rate["1"]),
                              "tokens/s", f"{words['ours']}; torch.set_num_threads(1)",
                              "the same; torch.set_num_threads(2)", round(rate["2"]),
                              round(rate["1"] / rate["2"], 2),
                              f"load {min(loads):.1f}-{max(loads):.1f}"))  # fmt: skip
    elif args.full:
        runs = full_builds(ours, reference, args.repeat)
        mid = {side: statistics.median(r["wall_s"] for r in found) for side, found in runs.items()}
        figures.append(Figure("base build wall time (median)", round(mid["ours"], 1), "s",
                              words["ours"], words["reference"], round(mid["reference"], 1),
                              round(mid["ours"] / mid["reference"], 3)))  # fmt: skip
        for side, found in runs.items():
            for r in found:
                print(f"{side}: {r['wall_s']:.1f} s (load {r['load']:.1f}), pre-training "
                      f"{r['pretrain']['seconds']} s, tokens {r['pretrain']['tokens_seen']:,}, "
                      f"probes {r['probes']}")  # fmt: skip
        details = {"runs": runs}
    else:
        details = project(ours, reference, args.sample_steps, args.repeat)
        tokens = {side: sum(plan.values()) for side, plan in details["tokens"].items()}
        secs = details["projected_pretrain_s"]
        figures.append(Figure("pre-training tokens", tokens["ours"], "tokens", words["ours"],
                              words["reference"], tokens["reference"],
                              round(tokens["ours"] / tokens["reference"], 3),
                              "exact: each side's seeded batch plan replayed"))  # fmt: skip
        figures.append(Figure("projected pre-training time", round(secs["ours"], 1), "s",
                              words["ours"], words["reference"], round(secs["reference"], 1),
                              round(secs["ours"] / secs["reference"], 3),
                              "tokens x median measured s/token per phase (same code both "
                              f"sides); load {min(details['loads']):.1f} to "
                              f"{max(details['loads']):.1f}"))  # fmt: skip
        print(f"tokens per phase: {details['tokens']}")
        per_1k = {k: round(v * 1e3, 3) for k, v in details["seconds_per_token"].items()}
        print(f"s per 1k tokens: {per_1k}")
        print(f"fixed costs (s): { {k: round(v, 1) for k, v in details['fixed_s'].items()} }")
    print_figures(figures)
    print(f"load average at start {record.load_average}")
    print(f"wrote {write_record(record, figures, details, out=args.out)}")


if __name__ == "__main__":
    main()
