"""SFT throughput and time to loss: tracetune's SFT set-up against plain TRL `SFTTrainer`.

Every arm trains the same base model on the same pre-tokenised examples (identical tokens and
assistant masks) in one process, at torch's default threads (what a plain user gets); the arms
take turns `--repeat` times and each figure is the median. The arms:

* reference: `SFTConfig` defaults (bf16 autocast, gradient checkpointing, random padded batches
  of 8, lr 2e-5, linear decay), exactly what a TRL script gets without tuning;
* reference_lr: the same TRL defaults with our learning rate (`sft.learning_rate`), the fair
  partner of our tuned hyperparameters;
* systems_only: the reference's hyperparameters with our systems settings (fp32 on CPU, no
  gradient checkpointing, length-grouped batches);
* systems_shared: systems_only plus our shared-prefix batches (`sft.share_prefix`: the system
  turn and tool schemas run once per batch); every setting else identical to systems_only;
* tracetune: our hyperparameters from params.yaml (`sft:` learning rate, batch, scheduler).

Figures, each naming both sides' settings (the fairness rules of issue 23):

* same training: systems_shared against systems_only, the only pair with identical settings;
* tokens/s counts tokens *computed* (non-pad tokens that went through the model: a shared
  prefix counts once per batch); tokens *covered* (every row's non-pad tokens) is reported
  beside it;
* time to loss, at equal hyperparameters: systems_shared's time to the reference's final loss
  against the reference's own first time at its final loss (not its whole run);
* time to loss "with tuned hyperparameters": tracetune against reference_lr (TRL defaults with
  the same learning rate), the same way.

    python bench/bench_sft.py --base models/base --steps 40 --repeat 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record

from tracetune.config import SFTParams, load_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.sft import build_dataset, read_trajectories

ARMS = ("reference", "reference_lr", "systems_only", "systems_shared", "tracetune")


class _Clock:
    """Trainer callback recording (seconds since the start of training, loss) at each log."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.start = time.perf_counter()

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs:
                    clock.points.append((time.perf_counter() - clock.start, float(logs["loss"])))

        self.start = 0.0
        self.points: list[tuple[float, float]] = []
        self.callback = CB()


def counting_trainer(base: type, share: bool) -> type:
    """`base` counting, per training batch, the tokens computed and the tokens covered.

    Covered: every row's non-pad tokens. Computed: the same, less the shared prefix's repeats
    (a shared-prefix batch runs its prefix once, not once per row). Pads count in neither.
    """
    from tracetune.training.prefix import shared_prefix_length

    class Counting(base):
        computed = 0
        covered = 0

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if model.training:
                ids, mask = inputs["input_ids"], inputs.get("attention_mask")
                real = int(mask.sum()) if mask is not None else int(ids.numel())
                cut = 0
                if share and mask is not None and "labels" in inputs:
                    cut = shared_prefix_length(ids, inputs["labels"])
                self.covered += real
                self.computed += real - (ids.shape[0] - 1) * cut
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return Counting


def heldout_loss(model: Any, dataset: Any) -> float:
    """Mean assistant-only token loss over `dataset`, one example at a time, fp32."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"], strict=True):
            x = torch.tensor([ids])
            labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)]])
            out = model(input_ids=x, labels=labels)
            n = int(sum(mask[1:]))
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def run_one(
    name: str, base: str, dataset: Any, config: Any, evalset: Any, share: bool
) -> dict[str, Any]:
    """Train one arm; tokens/s over the whole `trainer.train()` call."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from tracetune.agent.model import load_tokenizer
    from tracetune.training.prefix import prefix_sharing_trainer

    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base)
    clock = _Clock()
    trainer_class = counting_trainer(prefix_sharing_trainer() if share else SFTTrainer, share)
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock.callback],
    )
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    final = clock.points[-1][1] if clock.points else math.nan
    return {
        "name": name,
        "steps": int(out.global_step),
        "seconds": round(seconds, 2),
        "tokens_computed": trainer.computed,
        "tokens_covered": trainer.covered,
        "computed_per_s": round(trainer.computed / seconds, 1),
        "covered_per_s": round(trainer.covered / seconds, 1),
        "final_train_loss": round(final, 4),
        "own_final_loss_at_s": time_to(clock.points, final),
        "heldout_loss": round(heldout_loss(trainer.model, evalset), 4),
        "curve": clock.points,
    }


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the first logged loss at or below `target` (None: never)."""
    return next((round(t, 2) for t, loss in curve if loss <= target), None)


def config_for(kind: str, out: Path, sft: SFTParams, steps: int, logging_steps: int) -> Any:
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    common: dict[str, Any] = {
        "output_dir": str(out / kind),
        "report_to": [],
        "max_steps": steps,
        "save_strategy": "no",
        "logging_steps": logging_steps,
        "disable_tqdm": True,
        "seed": 0,
    }
    if kind == "reference":
        return SFTConfig(**common, use_cpu=not cuda)  # TRL defaults (bf16 on CPU needs use_cpu)
    if kind == "reference_lr":
        return SFTConfig(**common, use_cpu=not cuda, learning_rate=sft.learning_rate)
    systems: dict[str, Any] = {
        "bf16": cuda,
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
    }
    if kind in ("systems_only", "systems_shared"):
        return SFTConfig(**common, **systems)
    ours: dict[str, Any] = {
        "learning_rate": sft.learning_rate,
        "per_device_train_batch_size": sft.batch_size,
        "lr_scheduler_type": sft.lr_scheduler,
        "warmup_steps": sft.warmup_ratio,
        "max_length": sft.max_length,
    }
    return SFTConfig(**common, **systems, **ours)


def describe(config: Any, share: bool) -> str:
    """An arm's settings in words, from the config it actually trained with."""
    import torch

    order = "length-grouped" if config.train_sampling_strategy == "group_by_length" else "random"
    precision = "bf16 autocast" if config.bf16 else "fp32"
    scheduler = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    return (
        f"torch threads {torch.get_num_threads()} (default), {precision}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"batch {config.per_device_train_batch_size} ({order}), lr {config.learning_rate:g} "
        f"({scheduler}), max length {config.max_length}, "
        f"{config.max_steps} steps, "
        f"shared prefix {'on' if share else 'off'}"
    )


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    found = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(found), 2) if found else None


def figures(
    runs: dict[str, list[dict[str, Any]]], settings: dict[str, str], data: str
) -> list[Figure]:
    """The headline figures, each with both sides' settings (module doc)."""

    def med(arm: str, key: str) -> float | None:
        return median_of(runs[arm], key)

    def reach(ours: str, ref: str) -> tuple[float | None, float | None]:
        """(ours: median time to the paired reference run's final loss, reference: its own)."""
        mine = [
            time_to(o["curve"], r["final_train_loss"])
            for o, r in zip(runs[ours], runs[ref], strict=True)
        ]
        got = [t for t in mine if t is not None]
        return (round(statistics.median(got), 2) if got else None), med(ref, "own_final_loss_at_s")

    out = []
    shared, plain = "systems_shared", "systems_only"
    out.append(
        Figure(
            name="SFT same training: shared prefix vs systems-only, tokens covered/s",
            value=med(shared, "covered_per_s") or 0.0,
            unit="tokens covered/s",
            ours=f"systems_shared: {settings[shared]}; {data}",
            reference=f"systems_only: {settings[plain]}; {data}",
            reference_value=med(plain, "covered_per_s"),
            ratio=_ratio(med(shared, "covered_per_s"), med(plain, "covered_per_s")),
            note=(
                "identical settings but the shared prefix; tokens computed/s "
                f"{med(shared, 'computed_per_s')} vs {med(plain, 'computed_per_s')}; "
                f"final train loss {med(shared, 'final_train_loss')} vs "
                f"{med(plain, 'final_train_loss')}, held-out "
                f"{med(shared, 'heldout_loss')} vs {med(plain, 'heldout_loss')}"
            ),
        )
    )
    for arm, label in ((plain, "systems-only"), (shared, "shared prefix")):
        out.append(
            Figure(
                name=f"SFT tokens computed/s: {label} vs TRL defaults",
                value=med(arm, "computed_per_s") or 0.0,
                unit="tokens computed/s",
                ours=f"{arm}: {settings[arm]}",
                reference=f"reference: {settings['reference']}",
                reference_value=med("reference", "computed_per_s"),
                ratio=_ratio(med(arm, "computed_per_s"), med("reference", "computed_per_s")),
                note=(
                    f"tokens covered/s {med(arm, 'covered_per_s')} vs "
                    f"{med('reference', 'covered_per_s')} (the prefix counts once per batch in "
                    "computed, once per row in covered); different training (precision, order)"
                ),
            )
        )
    for ours, ref, label in (
        (shared, "reference", "equal hyperparameters"),
        ("tracetune", "reference_lr", "with tuned hyperparameters"),
    ):
        mine, theirs = reach(ours, ref)
        out.append(
            Figure(
                name=f"SFT time to the reference's final loss, {label} (ratio: x faster)",
                value=mine if mine is not None else math.nan,
                unit="s",
                ours=f"{ours}: {settings[ours]}",
                reference=f"{ref}: {settings[ref]}",
                reference_value=theirs,
                ratio=_ratio(theirs, mine),
                note=(
                    "reference time: its first log at or below its own final train loss "
                    f"({med(ref, 'final_train_loss')}), not its whole run "
                    f"({med(ref, 'seconds')} s); ratio = reference time / ours"
                    + ("; ours never reached it" if mine is None else "")
                ),
            )
        )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="base model path (default: params base_model)")
    ap.add_argument("--train", default="data/curated/train.jsonl")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--logging-steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all arms, interleaved")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", default="/tmp/tracetune-bench-sft")
    args = ap.parse_args()
    record = start_record("bench_sft")
    params = load_params()
    base = args.base or params.base_model.name_or_path
    from tracetune.agent.model import load_tokenizer

    tokenizer = load_tokenizer(base)
    rows = read_trajectories(Path(args.train), args.examples + 32)
    tools = SupportDesk().tool_schemas()
    dataset, _ = build_dataset(tokenizer, rows[32:], tools, params.sft.max_length)
    evalset, _ = build_dataset(tokenizer, rows[:32], tools, params.sft.max_length)
    out = Path(args.out)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    settings: dict[str, str] = {}
    for round_ in range(max(1, args.repeat)):
        for kind in args.arms:
            config = config_for(kind, out, params.sft, args.steps, args.logging_steps)
            share = kind == "systems_shared" or (kind == "tracetune" and params.sft.share_prefix)
            settings[kind] = describe(config, share)
            print(f"== round {round_ + 1}, {kind}: {settings[kind]}", flush=True)
            found = run_one(kind, base, dataset, config, evalset, share)
            print({k: v for k, v in found.items() if k != "curve"}, flush=True)
            runs[kind].append(found)
        # Written after every round: a run cut short still leaves its finished rounds.
        report(record, runs, settings, dataset, args, base, round_ + 1)


def report(
    record: Any,
    runs: dict[str, list[dict[str, Any]]],
    settings: dict[str, str],
    dataset: Any,
    args: argparse.Namespace,
    base: str,
    rounds: int,
) -> None:
    """Print both sides' settings and the figures; write the record (all arms only)."""
    per_row = sum(len(x) for x in dataset["input_ids"]) / len(dataset)
    data = (
        f"{len(dataset)} examples from {args.train}, {per_row:.0f} tokens per row, base {base}, "
        f"median of {rounds} interleaved rounds"
    )
    figs = figures(runs, settings, data) if set(ARMS) <= set(runs) else []
    details = {
        "budget": f"{args.steps} steps per arm, {rounds} of {max(1, args.repeat)} rounds, "
        f"{len(dataset)} examples",
        "data": data,
        "settings": settings,
        "runs": {
            arm: [{k: v for k, v in r.items() if k != "curve"} for r in rs]
            for arm, rs in runs.items()
        },
    }
    print(f"\nsettings ({data}):")
    for arm, words in settings.items():
        print(f"  {arm}: {words}")
    if figs:
        print_figures(figs)
        print(f"record: {write_record(record, figs, details)}", flush=True)


if __name__ == "__main__":
    main()
