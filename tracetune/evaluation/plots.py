"""PNG plots of one evaluation: TSR with 95% intervals, steps and cost per task, per arm.

matplotlib runs headless (Agg) and is imported inside the function: importing tracetune stays
cheap, and stages on servers need no display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracetune.evaluation.report import present_arms

PALETTE = {"candidate": "#2b6cb0", "baseline_prompt_only": "#a0aec0",
           "baseline_production": "#dd6b20", "baseline_floor": "#4a5568"}  # fmt: skip


def _arms(metrics: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    model = metrics.get("model", "candidate")
    labels = {"candidate": str(model), "baseline_prompt_only": "prompt-only",
              "baseline_production": "production", "baseline_floor": "do nothing"}  # fmt: skip
    return [(labels[key], metrics[key]) for key, _ in present_arms(metrics)]


def _colors(metrics: Mapping[str, Any]) -> list[str]:
    return [PALETTE[key] for key, _ in present_arms(metrics)]


def _value(block: Mapping[str, Any], key: str) -> float:
    value = block.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def write_plots(metrics: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """`tsr.png`, `steps.png`, `cost.png` in `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    arms = _arms(metrics)
    names = [name for name, _ in arms]
    written = []

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    tsr = [_value(b, "tsr") for _, b in arms]
    low = [
        max(0.0, t - _value(b, "tsr_ci_low")) if b.get("n") else 0.0
        for t, (_, b) in zip(tsr, arms, strict=True)
    ]
    high = [
        max(0.0, _value(b, "tsr_ci_high") - t) if b.get("n") else 0.0
        for t, (_, b) in zip(tsr, arms, strict=True)
    ]
    ax.bar(names, tsr, yerr=[low, high], capsize=6, color=_colors(metrics))
    ax.set_ylim(0, 1)
    ax.set_ylabel("task success rate")
    ax.set_title(f"TSR with 95% CI ({metrics.get('n_tasks', 0)} held-out tasks)")
    written.append(_save(fig, out_dir / "tsr.png"))

    for key, label, file in (
        ("steps_mean", "steps per task (mean)", "steps.png"),
        ("cost_per_task_usd", "cost per task (USD)", "cost.png"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.bar(names, [_value(b, key) for _, b in arms], color=_colors(metrics))
        ax.set_ylabel(label)
        ax.set_title(label)
        written.append(_save(fig, out_dir / file))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
