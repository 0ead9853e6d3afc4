"""SFT throughput: tracetune's SFT set-up against plain TRL `SFTTrainer` defaults, in one run.

Both train the same base model on the same pre-tokenised examples (identical tokens and
assistant masks), so the differences are the trainer set-up only:

* reference: `SFTConfig` defaults (bf16 autocast, gradient checkpointing, random padded batches
  of 8, lr 2e-5), exactly what a TRL script gets without tuning;
* systems-only: the reference's hyperparameters with our systems settings (fp32 on CPU, no
  gradient checkpointing, length-grouped batches): a pure tokens/s comparison;
* systems+shared-prefix: the same plus our trainer's shared-prefix batches (the system turn and
  tool schemas run once per batch, `sft.share_prefix`): still the reference's hyperparameters;
* tracetune: our defaults from params.yaml (`sft:`), which also change the learning rate;
* tracetune_packed: the same with `sft.batching: packed` (padding-free best-fit packing).

Reported: real (non-pad) tokens/s of each; the held-out assistant-only loss after training,
computed the same way for all; and time-to-equal-loss: how long tracetune's run took to first
log a training loss at or below the reference's final one.

    .venv/bin/python bench/bench_sft.py --seconds 120
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from tracetune.config import SFTParams, load_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.sft import build_dataset, read_trajectories


class _Clock:
    """Trainer callback recording (seconds since start, loss) at each log."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.start = time.perf_counter()

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs:
                    clock.points.append((time.perf_counter() - clock.start, float(logs["loss"])))
                if logs and "num_tokens" in logs:  # TRL's count of real (non-pad) tokens
                    clock.tokens = (time.perf_counter() - clock.start, float(logs["num_tokens"]))

        self.start = 0.0
        self.points: list[tuple[float, float]] = []
        self.tokens: tuple[float, float] = (0.0, 0.0)
        self.callback = CB()


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
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from tracetune.agent.model import load_tokenizer
    from tracetune.training.prefix import prefix_sharing_trainer

    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base)
    clock = _Clock()
    trainer_class = prefix_sharing_trainer() if share else SFTTrainer
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
    steps = int(out.global_step)
    at, tokens = clock.tokens  # real tokens trained up to the last log, and when
    return {
        "name": name,
        "steps": steps,
        "seconds": round(seconds, 1),
        "real_tokens": int(tokens),
        "tokens_per_s": round(tokens / max(at, 1e-9), 1),
        "final_train_loss": clock.points[-1][1] if clock.points else math.nan,
        "heldout_loss": round(heldout_loss(trainer.model, evalset), 4),
        "curve": clock.points,
    }


def config_for(kind: str, out: Path, sft: SFTParams, steps: int) -> Any:
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    common = {
        "output_dir": str(out / kind),
        "report_to": [],
        "max_steps": steps,
        "save_strategy": "no",
        "logging_steps": 2,
        "disable_tqdm": True,
        "seed": 0,
    }
    if kind == "reference":
        return SFTConfig(**common, use_cpu=not cuda)  # TRL defaults (bf16 on CPU needs use_cpu)
    systems = {
        "bf16": cuda,
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
    }
    if kind in ("systems_only", "systems_shared"):
        return SFTConfig(**common, **systems)
    ours = {
        "learning_rate": sft.learning_rate,
        "per_device_train_batch_size": sft.batch_size,
        "lr_scheduler_type": sft.lr_scheduler,
        "warmup_steps": sft.warmup_ratio,
        "max_length": sft.max_length,
    }
    if kind == "tracetune_packed":  # `sft.batching: packed`: padding-free BFD packing
        systems |= {"train_sampling_strategy": "random"}
        ours |= {"packing": True, "packing_strategy": "bfd", "padding_free": True}
    return SFTConfig(**common, **systems, **ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="base model path (default: params base_model)")
    ap.add_argument("--train", default="data/curated/train.jsonl")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--out", default="/tmp/tracetune-bench-sft")
    args = ap.parse_args()
    params = load_params()
    base = args.base or params.base_model.name_or_path
    from tracetune.agent.model import load_tokenizer

    tokenizer = load_tokenizer(base)
    rows = read_trajectories(Path(args.train), args.examples + 32)
    tools = SupportDesk().tool_schemas()
    dataset, _ = build_dataset(tokenizer, rows[32:], tools, params.sft.max_length)
    evalset, _ = build_dataset(tokenizer, rows[:32], tools, params.sft.max_length)
    out = Path(args.out)
    results = []
    shares = {"systems_shared": True, "tracetune": params.sft.share_prefix}
    for kind in ("reference", "systems_only", "systems_shared", "tracetune", "tracetune_packed"):
        config = config_for(kind, out, params.sft, args.steps)
        share = shares.get(kind, False)
        print(f"== {kind}: {args.steps} steps, batch {config.per_device_train_batch_size}")
        results.append(run_one(kind, base, dataset, config, evalset, share))
    ref, sys_only, sys_shared, ours, packed = results
    target = ref["final_train_loss"]
    reach = next((t for t, loss in ours["curve"] if loss <= target), None)
    summary = {
        "examples": len(dataset),
        "tokens_per_example": round(sum(len(x) for x in dataset["input_ids"]) / len(dataset), 1),
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "tokens_per_s_ratio_systems_only": round(sys_only["tokens_per_s"] / ref["tokens_per_s"], 2),
        "tokens_per_s_ratio_systems_shared": round(
            sys_shared["tokens_per_s"] / ref["tokens_per_s"], 2
        ),
        "tokens_per_s_ratio_tracetune": round(ours["tokens_per_s"] / ref["tokens_per_s"], 2),
        "tokens_per_s_ratio_tracetune_packed": round(
            packed["tokens_per_s"] / ref["tokens_per_s"], 2
        ),
        "time_to_reference_loss_s": None if reach is None else round(reach, 1),
        "time_to_equal_loss_speedup": None if reach is None else round(ref["seconds"] / reach, 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
