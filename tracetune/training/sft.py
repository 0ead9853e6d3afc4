"""Supervised fine-tuning on golden trajectories: TRL's SFTTrainer with our data preparation.

Why we tokenise ourselves instead of handing TRL a conversational dataset: (1) `datasets` would
merge the JSON schemas of different tools into one Arrow struct and render nulls (STACK.md);
(2) our chat template's `{% generation %}` blocks give the assistant mask directly, and we check
it contains each assistant turn's `<|im_end|>` before training, not after. TRL then builds the
labels from `assistant_masks`, packs padding-free (best-fit decreasing) and trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.agent.template import IM_END, normalize_messages
from tracetune.config import SFTParams
from tracetune.training.mixing import mixed_epoch
from tracetune.training.prefix import prefix_sharing_trainer
from tracetune.training.rekey import compile_patterns, rekeyed_passes
from tracetune.training.windows import CutReport, conversation_examples

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FINGERPRINT_FILE = "tracetune_fingerprint.json"
log = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    assistant_masks: list[int]


@dataclass
class SFTResult:
    """What the SFT stage reports (metrics file and MLflow)."""

    examples: int
    dropped_too_long: int  # assistant turns that fit in no window (never trained)
    train_tokens: int
    trained_tokens: int
    steps: int
    epochs: float
    seconds: float
    tokens_per_second: float
    first_loss: float | None
    final_loss: float | None
    resumed_from: str | None
    use_lora: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    cuts: dict[str, int] = field(default_factory=dict)  # CutReport per epoch of data
    max_length: int | None = None  # the effective one (capped at the model's context)

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        out.pop("cuts")
        out |= {f"cut_{k}": v for k, v in self.cuts.items()}
        return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def read_trajectories(path: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Curated trajectories (one JSON per line, the `Trajectory` schema)."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
                if limit and len(out) >= limit:
                    break
    return out


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
) -> TokenizedExample:
    """Token ids and the assistant-output mask from the chat template's generation blocks."""
    enc: Any = tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=list(tools) if tools else None,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return TokenizedExample(list(enc["input_ids"]), list(enc["assistant_masks"]))


def check_mask(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> None:
    """Every assistant turn's end-of-turn token must be trained, or the model never stops."""
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    ends = [
        i
        for i, tok in enumerate(example.input_ids)
        if tok == end_id and any(example.assistant_masks[max(0, i - 3) : i])
    ]
    if not ends or not all(example.assistant_masks[i] for i in ends):
        raise ValueError(
            "chat template does not put the assistant's <|im_end|> inside {% generation %}: "
            "the model would never learn to stop"
        )
    if not any(example.assistant_masks):
        raise ValueError("no assistant tokens in the loss mask")


def build_dataset(
    tokenizer: PreTrainedTokenizerBase,
    trajectories: Iterable[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    max_length: int,
    context: int | None = None,
) -> tuple[Dataset, CutReport]:
    """Pre-tokenised dataset (`input_ids`, `assistant_masks`) and what fitting it cost.

    A conversation longer than `max_length` becomes windows (`tracetune.training.windows`);
    `context` (the model's) only counts the conversations longer than it. Raises when not one
    assistant turn of any conversation fits, naming what takes the room.
    """
    from datasets import Dataset

    def encode(messages: Sequence[dict[str, Any]]) -> TokenizedExample:
        return tokenize_conversation(tokenizer, messages, tools)

    def count_text(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    rows: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    report = CutReport()
    for traj in trajectories:
        examples = conversation_examples(
            traj["messages"], encode, max_length, report, count_text, decode, context
        )
        for example in examples:
            if not rows["input_ids"]:
                check_mask(tokenizer, example)
            rows["input_ids"].append(example.input_ids)
            rows["assistant_masks"].append(example.assistant_masks)
    if not rows["input_ids"]:
        raise ValueError(
            f"no assistant turn of {report.conversations} conversations fits "
            f"sft.max_length={max_length}, even with the oldest turns dropped and the system "
            f"prompt cut to half of it ({report.as_dict()}): raise sft.max_length or shorten the "
            "tool schemas"
        )
    return Dataset.from_dict(rows), report


def log_cuts(report: dict[str, int], max_length: int, context: int | None) -> None:
    """One warning per kind of cut, so that a user sees what long conversations cost."""
    if report["windowed"]:
        log.warning(
            "sft: %d of %d conversations are longer than sft.max_length=%d: cut into windows "
            "(%d examples in all; %d history tokens left out; %d assistant turns fit nowhere)",
            report["windowed"],
            report["conversations"],
            max_length,
            report["examples"],
            report["history_tokens_cut"],
            report["turns_dropped"],
        )
    if report["system_prompts_cut"]:
        log.warning(
            "sft: the system prompt of %d conversations was cut to half of sft.max_length "
            "(%d tokens cut)",
            report["system_prompts_cut"],
            report["system_tokens_cut"],
        )
    if report["over_context"]:
        log.warning(
            "sft: %d conversations (the longest %d tokens) are longer than the model's context "
            "(%s tokens): it cannot read them whole when it serves either",
            report["over_context"],
            report["longest"],
            context,
        )


def model_context(model: Any) -> int | None:
    """The longest sequence the model's positions cover (None when its config does not say)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


# ---------------------------------------------------------------------------------------------
# Model and trainer
# ---------------------------------------------------------------------------------------------
def attach_lora(model: PreTrainedModel, params: SFTParams) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in params.lora.target_modules if t in names]
    if not targets:
        raise ValueError(f"none of lora.target_modules {params.lora.target_modules} in the model")
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)  # type: ignore[return-value]


def data_passes(params: SFTParams) -> int:
    """Copies of the train set in the dataset: one per started epoch when ids are re-keyed or
    the family mix is re-drawn (each epoch differs), else one."""
    varies = bool(params.rekey_ids) or params.family_alpha != 1
    return math.ceil(params.epochs) if varies else 1


def epoch_data(
    trajectories: Sequence[dict[str, Any]], params: SFTParams, passes: int
) -> list[dict[str, Any]]:
    """The `passes` epochs of training data, back to back: the family mix drawn per epoch
    (`family_alpha`), then identifiers re-keyed per epoch (`rekey_ids`)."""
    if params.family_alpha == 1 and not params.rekey_ids:  # every epoch the same data
        return list(trajectories)
    ids = compile_patterns(params.rekey_ids)
    out: list[dict[str, Any]] = []
    for p in range(passes):
        epoch = mixed_epoch(trajectories, params.family_alpha, params.seed, p)
        out.extend(rekeyed_passes(epoch, ids, 1, params.seed, first_pass=p) if ids else epoch)
    return out


def trainer_config(
    params: SFTParams, output_dir: Path, cuda: bool, report_to: list[str], passes: int = 1
) -> Any:
    """TRL config: bf16 and gradient checkpointing only where they pay (GPU), never on CPU.

    `passes` re-keyed copies of the data make one trainer epoch worth `passes` of ours.
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=params.epochs / passes,
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        weight_decay=params.weight_decay,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        max_length=params.max_length,
        packing=params.batching == "packed",
        packing_strategy="bfd",
        padding_free=params.batching == "packed",
        train_sampling_strategy="group_by_length" if params.batching == "grouped" else "random",
        bf16=cuda,
        fp16=False,
        activation_checkpointing=False,  # transformers 5's name (the old one warns)
        dataloader_pin_memory=cuda,  # pinning on CPU only warns
        logging_steps=params.logging_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,
        seed=params.seed,
        data_seed=params.seed,
        report_to=report_to,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def fingerprint(params: SFTParams, base: str, data_md5: str) -> str:
    """Identity of a training run: checkpoints resume only into the run that wrote them.

    `base` is the base model's content hash, not its path: a rebuilt `models/base` (new
    tokenizer, new weights) must not resume the old run's last checkpoint, which would skip
    training and pair the old weights with the new tokenizer.
    """
    blob = json.dumps(
        {"p": params.model_dump(mode="json"), "b": base, "d": data_md5}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_checkpoints(checkpoint_dir: Path, run_id: str) -> str | None:
    """The checkpoint to resume from, or None; stale checkpoints of another run are wiped."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = checkpoint_dir / FINGERPRINT_FILE
    if checkpoint_dir.exists():
        same = stamp.exists() and json.loads(stamp.read_text()).get("run") == run_id
        if not same:
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"run": run_id}))
    return get_last_checkpoint(str(checkpoint_dir))


def finished_state(checkpoint: str | None) -> dict[str, Any] | None:
    """The trainer state of a checkpoint that already holds its run's last step, else None."""
    if checkpoint is None:
        return None
    path = Path(checkpoint) / "trainer_state.json"
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    max_steps = int(state.get("max_steps") or 0)
    return state if max_steps > 0 and int(state.get("global_step", 0)) >= max_steps else None


def score_only_trained_positions() -> None:
    """Let TRL's fused LM head project only the positions that have a label, on every device.

    TRL 1.16 scores only those on Triton devices and every position elsewhere (zeroing the
    rest afterwards), to spare compiled backends a new tile shape per batch. Eager CPU has no
    such cost, and an agent's SFT rows are mostly untrained tokens (system turn, user text,
    tool results): the same loss and gradients, up to float summation order, for an SFT step
    1.33x faster on the embedded default (docs/benchmarks.md "Demo time"). Opt-in
    (`sft.trained_positions_only`): a different float order is a different training run, and
    two runs cannot yet tell its held-out TSR from the default's. The switch is TRL's
    module-level choice; a TRL without it is left as it is.
    """
    import trl.trainer.utils as trl_utils

    choose = getattr(trl_utils, "_use_triton", None)
    if choose is None or getattr(choose, "every_device", False):
        return

    def compact_everywhere(device: Any) -> bool:
        return bool(choose(device)) or device.type == "cpu"

    compact_everywhere.every_device = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_everywhere


def train_or_restore(trainer: Any, resume: str | None) -> Any:
    """`trainer.train`, except from a checkpoint that is already the run's last step (a run
    killed after its final save): its weights and state are loaded and nothing trains.
    Resuming there used to take one step more (checkpoint-31 for max_steps 30)."""
    if finished_state(resume) is None:
        return trainer.train(resume_from_checkpoint=resume)
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    assert resume is not None
    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainOutput(
        trainer.state.global_step,
        sum(losses) / len(losses) if losses else 0.0,
        {"epoch": trainer.state.epoch},
    )


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _main_process_first() -> Any:
    """A context where rank 0 runs first and the other ranks wait (a no-op alone)."""
    from accelerate import PartialState

    return PartialState().main_process_first()


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_sft(
    params: SFTParams,
    base_model: str,
    train_path: Path,
    tools: Sequence[dict[str, Any]],
    out_dir: Path,
    checkpoint_dir: Path,
    report_to: list[str] | None = None,
    callbacks: Sequence[Any] = (),
) -> SFTResult:
    """Train, save the adapter (LoRA) and a merged Hugging Face model under `out_dir`.

    Layout: `out_dir/merged` (always: what evaluation and the registry load) and
    `out_dir/adapter` (LoRA only). A crashed run resumes from the newest checkpoint of the
    same run (same params, base and data).
    """
    import torch
    from trl import SFTTrainer

    from tracetune.agent.model import load_model, model_fingerprint
    from tracetune.console import SFT_KEYS, compact_trainer_output
    from tracetune.training.memory import bound_heap_for

    started = time.perf_counter()
    model, tokenizer = load_model(base_model)
    bound_heap_for(model)  # a long run's RSS tracks use, not fragmentation
    tokenizer.padding_side = "right"
    model.train()
    trajectories = read_trajectories(train_path, params.max_examples)
    passes = data_passes(params)  # >1: one varied copy per started epoch, as one long epoch
    trajectories = epoch_data(trajectories, params, passes)
    context = model_context(model)
    max_length = params.max_length
    if context is not None and max_length > context:
        log.warning(
            "sft.max_length=%d is longer than the model's context (%d): examples are cut to %d",
            max_length,
            context,
            context,
        )
        max_length = context
    dataset, cut_report = build_dataset(tokenizer, trajectories, tools, max_length, context)
    cuts = cut_report.scaled(passes)
    log_cuts(cuts, max_length, context)
    train_tokens = sum(len(ids) for ids in dataset["input_ids"]) // passes
    if params.use_lora:
        model = attach_lora(model, params)
    run_id = fingerprint(params, model_fingerprint(base_model), file_md5(train_path))
    with _main_process_first():  # under `accelerate launch`, rank 0 alone may wipe checkpoints
        resume = prepare_checkpoints(checkpoint_dir, run_id)
    cuda = next(model.parameters()).device.type == "cuda"
    if params.trained_positions_only:
        score_only_trained_positions()
    trainer_class = prefix_sharing_trainer() if params.share_prefix else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=trainer_config(params, checkpoint_dir, cuda, report_to or [], passes),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    compact_trainer_output(trainer, "sft", SFT_KEYS)  # one short line per shown log step
    train_start = time.perf_counter()
    output = train_or_restore(trainer, resume)
    train_seconds = time.perf_counter() - train_start
    history = [h for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, out_dir, params.use_lora)
    trainer.accelerator.wait_for_everyone()
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    epochs_done = float(output.metrics.get("epoch", params.epochs / passes)) * passes
    trained_tokens = int(train_tokens * epochs_done)
    return SFTResult(
        examples=len(dataset) // passes,
        dropped_too_long=cuts["turns_dropped"],
        train_tokens=train_tokens,
        trained_tokens=trained_tokens,
        steps=int(output.global_step),
        epochs=round(epochs_done, 3),
        seconds=round(time.perf_counter() - started, 2),
        tokens_per_second=round(trained_tokens / max(train_seconds, 1e-9), 1),
        first_loss=history[0]["loss"] if history else None,
        final_loss=history[-1]["loss"] if history else None,
        resumed_from=resume,
        use_lora=params.use_lora,
        history=history,
        cuts=cuts,
        max_length=max_length,
    )


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, lora: bool
) -> None:
    """Adapter (LoRA) and merged weights in Hugging Face format; the tokenizer beside both.

    Atomic (`tracetune.outputs`): a kill during the save leaves the previous `out_dir` whole,
    never a folder holding only `config.json`."""
    from tracetune.outputs import atomic_dir

    tokenizer.padding_side = "left"
    with atomic_dir(out_dir) as tmp:
        if lora:
            model.save_pretrained(str(tmp / "adapter"))
            tokenizer.save_pretrained(str(tmp / "adapter"))
            model = model.merge_and_unload()  # type: ignore[operator]
        model.save_pretrained(str(tmp / "merged"))
        tokenizer.save_pretrained(str(tmp / "merged"))
