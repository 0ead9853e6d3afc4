"""The evaluation report people read: one markdown file per evaluated model.

It puts the candidate beside both baselines and the do-nothing floor on the same held-out
tasks, with 95% intervals on every TSR and on every TSR difference (Newcombe), so a reader can
tell a real gain from noise, and a gain from what doing nothing already scores, without opening
the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tracetune.evaluation.metrics import tsr_difference

ARMS = (
    ("candidate", "candidate"),
    ("baseline_prompt_only", "prompt-only (base)"),
    ("baseline_production", "production logs"),
    ("baseline_floor", "do-nothing floor"),
)
FLOOR = "baseline_floor"


def present_arms(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The arms this eval file has (files written before the floor existed lack it)."""
    return [(key, label) for key, label in ARMS if isinstance(metrics.get(key), Mapping)]


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "n/a"


def _num(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def _tsr_cell(block: Mapping[str, Any]) -> str:
    if not block.get("n"):
        return "n/a (no data)"
    return (
        f"{_pct(block.get('tsr'))} [{_pct(block.get('tsr_ci_low'))}, "
        f"{_pct(block.get('tsr_ci_high'))}]"
    )


def _diff_cell(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    if not a.get("n") or not b.get("n"):
        return "n/a"
    d, low, high = tsr_difference(a, b)
    sign = "+" if d >= 0 else ""
    proven = " (significant)" if low > 0 or high < 0 else ""
    return f"{sign}{100 * d:.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]{proven}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """Metric rows: one column per arm."""
    blocks = [metrics[key] for key, _ in present_arms(metrics)]
    floor = metrics.get(FLOOR)
    rows = [["TSR [95% CI]", *[_tsr_cell(b) for b in blocks]]]
    if isinstance(floor, Mapping):
        rows.append(["TSR over the floor", *[_over_cell(b, floor) for b in blocks]])
    rows += [
        ["tasks (n)", *[str(b.get("n", 0)) for b in blocks]],
        ["cut by the turn limit", *[_count(b.get("cut_by_turn_limit")) for b in blocks]],
        ["steps per task (mean)", *[_num(b.get("steps_mean")) for b in blocks]],
        ["steps per task (median)", *[_num(b.get("steps_median"), ".1f") for b in blocks]],
        ["tokens in per task", *[_num(b.get("tokens_in"), ".0f") for b in blocks]],
        ["tokens out per task", *[_num(b.get("tokens_out"), ".0f") for b in blocks]],
        ["cost per task (USD)", *[_num(b.get("cost_per_task_usd"), ".6f") for b in blocks]],
        ["latency per task (s)", *[_num(b.get("latency_s"), ".3f") for b in blocks]],
    ]
    return rows


def _over_cell(block: Mapping[str, Any], floor: Mapping[str, Any]) -> str:
    tsr, base = block.get("tsr"), floor.get("tsr")
    if not isinstance(tsr, int | float) or not isinstance(base, int | float):
        return "n/a"
    return f"{100 * (tsr - base):+.1f} pts"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "n/a"


def family_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    blocks = [metrics[key] for key, _ in present_arms(metrics)]
    families = sorted({f for b in blocks for f in b.get("per_family", {})})
    rows = []
    for family in families:
        cells = []
        for block in blocks:
            entry = block.get("per_family", {}).get(family)
            cells.append(f"{_pct(entry['tsr'])} ({entry['n']})" if entry else "n/a")
        rows.append([family, *cells])
    return rows


def failure_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    blocks = [metrics[key] for key, _ in present_arms(metrics)]
    labels: list[str] = []
    for block in blocks:
        labels += [k for k in block.get("failures", {}) if k not in labels]
    return [
        [label, *[str(b.get("failures", {}).get(label, 0)) for b in blocks]] for label in labels
    ]


def render_report(
    metrics: Mapping[str, Any],
    settings: Mapping[str, Any],
    plots: Sequence[str] = (),
) -> str:
    """The markdown report of one evaluation (`metrics` is the eval JSON's content)."""
    cand = metrics["candidate"]
    prompt_only = metrics["baseline_prompt_only"]
    production = metrics["baseline_production"]
    floor = metrics.get(FLOOR)
    delta = metrics["delta"]
    names = [label for _, label in present_arms(metrics)]
    against = [
        [
            "prompt-only (base)",
            _diff_cell(cand, prompt_only),
            _num(_minus(cand.get("steps_mean"), prompt_only.get("steps_mean")), "+.2f"),
            _num(
                _minus(cand.get("cost_per_task_usd"), prompt_only.get("cost_per_task_usd")),
                "+.6f",
            ),
        ],
        [
            "production logs",
            _diff_cell(cand, production),
            _num(delta.get("steps_vs_production"), "+.2f"),
            _num(delta.get("cost_vs_production"), "+.6f"),
        ],
    ]
    if isinstance(floor, Mapping):
        against.append(
            [
                "do-nothing floor",
                _diff_cell(cand, floor),
                _num(_minus(cand.get("steps_mean"), floor.get("steps_mean")), "+.2f"),
                _num(_minus(cand.get("cost_per_task_usd"), floor.get("cost_per_task_usd")), "+.6f"),
            ]
        )
    lines = [
        f"# Evaluation: `{metrics['model']}`",
        "",
        f"Model `{metrics['model_path']}` on {metrics['n_tasks']} held-out tasks, against the "
        "base model prompted with the same system prompt and tools on the same tasks "
        "(prompt-only) and the production agent's logged episodes of the same tasks (failed "
        "episodes included)"
        + (
            ", and the do-nothing floor: an agent whose first message is a final answer that "
            "declines, no tool called. What the floor scores, the tasks give away; a gain is "
            "only a gain over it."
            if isinstance(floor, Mapping)
            else "."
        ),
        "",
        "## Summary",
        "",
        *_table(["metric", *names], summary_rows(metrics)),
        "",
        "## Candidate against each baseline",
        "",
        *_table(["baseline", "TSR difference [95% CI]", "steps", "cost per task (USD)"], against),
        "",
        "Intervals: Wilson for each TSR, Newcombe's hybrid score for differences (arms treated "
        "as independent, which is conservative for arms that share tasks).",
        "",
        "## TSR per task family (n)",
        "",
        *_table(["family", *names], family_rows(metrics)),
        "",
        "## Failure taxonomy (failed tasks)",
        "",
        *_table(["label", *names], failure_rows(metrics)),
        "",
        "`bad_format`: a turn the parser rejected; `unknown_tool` / `bad_arguments`: a call the "
        "environment refused; `step_cap`: no answer within the step or turn cap; "
        "`tool_error_unhandled`: a wrong answer after a tool error; `wrong_answer`: the verifier "
        "rejected the final answer (or state). A failed episode is labelled by the agent's first "
        "own fault, else by how it ended. `cut by the turn limit`: episodes the evaluation's "
        "turn limit ended before an answer (`max_turns` in the settings).",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Settings", "", *_table(["setting", "value"], _settings_rows(settings)), ""]
    return "\n".join(lines)


def _minus(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


def _settings_rows(settings: Mapping[str, Any]) -> list[list[str]]:
    return [[str(k), f"`{v}`"] for k, v in settings.items()]
