"""What the stages print: short lines with rounded numbers, not raw dicts and progress bars.

Why: the main job (`tracetune run`) streams every stage's output into one console. Trainer log
dicts (~1,500 characters per RLVR step), library progress bars, unrounded floats and DVC's
git hint after every stage made a walk-through's log 825 lines; the numbers live in
`metrics/*.json`, MLflow and the reports, so the console only needs to say what happened.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

# Trainer logs shown per training stage at most (first and last always): a 2,000-step SFT run
# must not print 200 lines. Every logged step still reaches MLflow and the curve CSV.
TRAINING_LINES = 10

# (label, key in the trainer's log) per training stage, in the order printed.
SFT_KEYS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("acc", "mean_token_accuracy"),
    ("lr", "learning_rate"),
    ("grad", "grad_norm"),
)
RLVR_KEYS: tuple[tuple[str, str], ...] = (
    ("reward", "reward"),
    ("success", "health/success_rate"),
    ("tool calls", "health/tool_call_rate"),
    ("kl", "kl"),
    ("loss", "loss"),
)

# Library progress bars (model loading, shard writing, dataset maps): seconds long, one
# console line per frame in a log file. Our own bars (rollouts, pre-training) stay.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables...", etc.
}

# DVC prints after every stage that ran. `core.autostage` (.dvc/config) stages dvc.lock
# instead of printing the git hint; no setting silences the push hint but `--quiet`, which
# also hides DVC's own errors, so the stage output drops these lines instead. The flow
# pushes to the remote itself, and dvc.lock is rewritten after every stage that ran.
DVC_HINTS = (
    "Updating lock file 'dvc.lock'",
    "To track the changes with git, run:",
    "To enable auto staging, run:",
    "dvc config core.autostage true",
    "Use `dvc push` to send your updates to remote storage.",
)
DVC_HINT_COMMANDS = ("git add ", "dvc config core.autostage")  # the commands the hints suggest


def is_dvc_hint(text: str) -> bool:
    """One line of DVC's advice to a person at a terminal (the live stage log drops it)."""
    return text.strip().startswith((*DVC_HINTS, *DVC_HINT_COMMANDS))


def num(value: Any, digits: int = 3) -> str:
    """A number as people read it in a log: 3 significant digits, no 5.551276683807373."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10**digits:  # 4310, not 4.31e+03
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def quiet_libraries() -> None:
    """Turn off library progress bars in a stage process (an exported value still wins), and
    the deprecation notices of library internals that nobody running the pipeline can act on."""
    import sys
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # TRL calls transformers' old name; our own configs use the new one (activation_*).
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )

    if "transformers" in sys.modules:  # imported before: its switch was read at import
        from transformers.utils import logging as hf_logging

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()


def without_dvc_hints(text: str) -> str:
    """DVC's output minus its git/push hints (and the blank lines around them)."""
    lines = text.splitlines()
    kept: list[str] = []
    skip_next_command = False
    for line in lines:
        stripped = line.strip()
        if any(stripped == hint for hint in DVC_HINTS):
            skip_next_command = stripped.endswith("run:")
            continue
        if skip_next_command and stripped:
            skip_next_command = False
            if stripped.startswith(("git add", "dvc config")):
                continue
        kept.append(line)
    out: list[str] = []
    for line in kept:  # collapse the blank runs the removed hints leave
        if not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def step_line(
    label: str, step: int, max_steps: int, logs: dict[str, Any], keys: Sequence[tuple[str, str]]
) -> str:
    """`rlvr step 3/20  reward -0.25  kl 0.01  loss 0.003`: the values a person watches."""
    parts = [f"{label} step {step}/{max_steps}" if max_steps > 0 else f"{label} step {step}"]
    parts += [f"{name} {num(logs[key])}" for name, key in keys if logs.get(key) is not None]
    return "  ".join(parts)


def shown_steps(max_steps: int, logging_steps: int, limit: int = TRAINING_LINES) -> int:
    """Every how many steps a log line is printed, so that a run prints about `limit` lines."""
    logs = max(1, math.ceil(max(max_steps, 1) / max(logging_steps, 1)))
    return max(logging_steps, 1) * max(1, math.ceil(logs / max(limit, 1)))


def console_callback(
    label: str, keys: Sequence[tuple[str, str]], limit: int = TRAINING_LINES
) -> Any:
    """A `TrainerCallback` printing one compact line per shown log step (main process only).

    Built lazily: transformers imports slowly, and `tracetune --help` must not pay for it.
    """
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.every = 1

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self.every = shown_steps(state.max_steps, int(args.logging_steps or 1), limit)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            step = int(state.global_step)
            first = step <= int(args.logging_steps or 1)
            if not (first or step >= state.max_steps or step % self.every == 0):
                return
            seconds = time.perf_counter() - self.started
            line = step_line(label, step, int(state.max_steps), logs, keys)
            print(f"{line}  {seconds:.1f} s", flush=True)

    return ConsoleCallback()


def compact_trainer_output(trainer: Any, label: str, keys: Sequence[tuple[str, str]]) -> None:
    """Replace the trainer's progress bar and log-dict printer with one line per shown step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(console_callback(label, keys))
