"""What the main job prints: rounded numbers, no DVC hints, short step lines, a closing block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flows.summary import approval_lines, eval_console_table, what_next
from tasks.evaluate import evaluation_lines
from tasks.rlvr import rlvr_lines
from tracetune.config import load_params
from tracetune.console import num, shown_steps, step_line, without_dvc_hints
from tracetune.training.grpo import RLVRResult

REPO = Path(__file__).resolve().parents[2]

# What `dvc repro --single-item split` printed in a walk-through (DVC 3.67), hints and all.
DVC_OUTPUT = """Running stage 'split':
> python -m tasks.split
split: train 159, held-out 19 (40 tasks)
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
"""


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (5.551276683807373, "5.55"),
        (-0.5142857142857143, "-0.514"),
        (0.000101, "0.000101"),
        (1.3e-05, "1.3e-05"),
        (4309.7, "4310"),
        (12, "12"),
        (0.0, "0"),
        (None, "None"),
        ("n/a", "n/a"),
    ],
)
def test_numbers_are_rounded_to_three_significant_digits(value: Any, shown: str) -> None:
    assert num(value) == shown


def test_dvc_hints_are_dropped_and_the_stage_output_kept() -> None:
    out = without_dvc_hints(DVC_OUTPUT)
    assert out.splitlines() == [
        "Running stage 'split':",
        "> python -m tasks.split",
        "split: train 159, held-out 19 (40 tasks)",
    ]
    assert without_dvc_hints("a\n\n\nb\ngit add is fine here\n") == "a\n\nb\ngit add is fine here"


def test_the_project_turns_dvc_autostage_on() -> None:
    """Uncaptured (training) stages print straight to the console: DVC must not hint there."""
    assert "autostage = true" in (REPO / ".dvc/config").read_text()


def test_step_line_is_short_and_rounded() -> None:
    logs = {"reward": -0.25003, "kl": 0.0123456, "loss": 0.0031, "health/success_rate": 0.375}
    keys = (("reward", "reward"), ("success", "health/success_rate"), ("kl", "kl"))
    line = step_line("rlvr", 3, 20, logs, keys)
    assert line == "rlvr step 3/20  reward -0.25  success 0.375  kl 0.0123"


@pytest.mark.parametrize(
    ("max_steps", "logging_steps", "limit", "every"),
    [(30, 1, 15, 2), (10, 1, 15, 1), (2000, 10, 15, 140), (5, 10, 15, 10)],
)
def test_long_runs_print_about_limit_lines(
    max_steps: int, logging_steps: int, limit: int, every: int
) -> None:
    assert shown_steps(max_steps, logging_steps, limit) == every
    assert max_steps // every <= limit + 1


def _eval_payload() -> dict[str, Any]:
    arm = {"tsr": 0.52999, "tsr_ci_low": 0.4612, "tsr_ci_high": 0.598, "n": 200}
    return {
        "n_tasks": 200,
        "candidate": arm | {"steps_mean": 2.6216, "cost_per_task_usd": 0.00123456},
        "baseline_production": arm | {"tsr": 0.68, "steps_mean": 3.1, "cost_per_task_usd": 0.002},
        "baseline_floor": arm | {"tsr": 0.0, "steps_mean": 1.0, "cost_per_task_usd": 0.0},
        "delta": {"tsr_vs_production": -0.15001, "tsr_vs_prompt_only": 0.53},
    }


def test_evaluation_prints_three_rounded_lines_and_the_report() -> None:
    lines = evaluation_lines("sft", _eval_payload(), Path("reports/eval/sft/report.md"))
    assert lines == [
        "evaluation of sft on 200 held-out tasks: TSR 0.53 [0.461, 0.598], 2.62 steps/task, "
        "$0.00123/task",
        "  baselines' TSR (this model's gap): production 0.68 (-0.15), floor 0 (+0.53)",
        "  report: reports/eval/sft/report.md",
    ]


def test_rlvr_says_why_its_reward_is_not_heldout_tsr() -> None:
    params = load_params(REPO / "params.yaml")
    result = RLVRResult(
        ran=True,
        decision={},
        steps=30,
        train_tasks=256,
        reward_first=0.2170001,
        reward_last=-0.5142,
        success_first=0.61,
        success_last=0.25,
        episodes_per_second=15.71,
        seconds_per_step=3.8123,
    )
    text = "\n".join(rlvr_lines(result, params))
    assert "training reward 0.217 -> -0.514" in text
    assert "sampled at temperature 1" in text and "greedy decoding" in text
    assert "held-out TSR (evaluate@rlvr)" in text and "docs/training.md" in text


def test_eval_console_table_rounds_every_number() -> None:
    rows = [
        {"candidate": "sft", "tsr": 0.53, "tsr_95ci": "[0.461, 0.598]", "latency_s": 0.02904},
        {"candidate": "baseline_floor", "tsr": 0.0, "cost_per_task_usd": 1.3e-05},
    ]
    table = eval_console_table(rows).splitlines()
    assert table[0].split() == ["model", "TSR", "95%", "CI", "steps", "$/task", "vs", "production"]
    assert table[1].split() == ["sft", "0.53", "[0.461,", "0.598]"]
    assert table[2].split() == ["baseline_floor", "0", "1.3e-05"]


def _stages(register: str = "ran", promote_note: str = "") -> list[dict[str, Any]]:
    return [
        {"name": "register", "status": register, "note": ""},
        {"name": "promote", "status": "skipped", "note": promote_note},
    ]


def test_what_next_names_the_reports_runs_registry_and_approval(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    for model in ("base", "sft"):
        report = tmp_path / params.paths.reports / "eval" / model / "report.md"
        report.parent.mkdir(parents=True)
        report.write_text("# report\n")
    metrics = tmp_path / params.paths.metrics
    metrics.mkdir(parents=True)
    (metrics / "register.json").write_text(
        json.dumps({"model": "tracetune-agent", "version": 3, "verdict": "passed"})
    )
    note = "v3 is challenger: `tracetune approve tracetune-agent 3 --by NAME` to promote it"
    text = what_next(tmp_path, params, _stages(promote_note=note))
    assert text.startswith(f"What next (commands run from {tmp_path}):")
    assert "reports/eval/base/report.md, reports/eval/sft/report.md" in text
    assert "dvc metrics show" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "tracetune registry status" in text
    assert "tracetune approve tracetune-agent 3 --by NAME" in text


def test_approval_line_says_why_the_gate_refused() -> None:
    registered = {
        "model": "m",
        "version": 2,
        "verdict": "failed",
        "reasons": ["PASS mean steps 1.00 <= max 10.00", "FAIL TSR gain vs production -0.5"],
    }
    lines = approval_lines(registered, True, "v2 failed the promotion gate")
    assert lines[0].endswith("nothing: v2 failed the promotion gate")
    assert lines[1].strip() == "FAIL TSR gain vs production -0.5" and len(lines) == 2
    assert "nothing newly registered" in approval_lines(registered, False, "")[0]
    assert "auto-approved" in approval_lines(registered | {"auto_approved": True}, True, "")[0]
    assert approval_lines(registered | {"verdict": "passed"}, True, "v2: approved") == [
        "  approve     v2: approved"
    ]
