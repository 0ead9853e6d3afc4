"""The evaluation report people read: one markdown file per evaluated model.

It puts the candidate beside both baselines and the do-nothing floor on the same held-out
tasks, with 95% intervals on every TSR and on every TSR difference (Newcombe), so a reader can
tell a real gain from noise, and a gain from what doing nothing already scores, without opening
the JSON.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
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


def _est(block: Mapping[str, Any], cell: str) -> str:
    """A usage cell marked when tracetune estimated (part of) it: logs without usage."""
    share = block.get("usage_estimated")
    return f"{cell} (estimated: {_pct(share)} of tasks)" if share else cell


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
        ["tokens in per task", *[_est(b, _num(b.get("tokens_in"), ".0f")) for b in blocks]],
        ["tokens out per task", *[_est(b, _num(b.get("tokens_out"), ".0f")) for b in blocks]],
        [
            "cost per task (USD)",
            *[_est(b, _num(b.get("cost_per_task_usd"), ".6f")) for b in blocks],
        ],
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
        lines += ["## Plots", ""] + [f"![{PurePosixPath(p).stem}]({p})" for p in plots] + [""]
    lines += ["## Settings", "", *_table(["setting", "value"], _settings_rows(settings)), ""]
    return "\n".join(lines)


def _minus(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


def _settings_rows(settings: Mapping[str, Any]) -> list[list[str]]:
    return [[str(k), f"`{v}`"] for k, v in settings.items()]


# --- the report and the comparison as MLflow shows them -----------------------------------------

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def relink_images(markdown: str, names: Collection[str]) -> str:
    """Image links whose file is in `names` made relative to the report's own folder.

    On disk the report links its plots in `reports/eval_plots/<model>/`; in an MLflow run they
    are logged beside it, where only the bare file name resolves.
    """

    def local(match: re.Match[str]) -> str:
        name = PurePosixPath(match.group(2)).name
        return f"![{match.group(1)}]({name})" if name in names else match.group(0)

    return _IMAGE.sub(local, markdown)


def report_html(markdown: str, images: Mapping[str, bytes], title: str = "report") -> str:
    """The markdown as one self-contained HTML page, images inlined: MLflow's artifact view
    renders HTML in a sandbox where relative links cannot load."""
    from markdown_it import MarkdownIt

    def inline(match: re.Match[str]) -> str:
        name = PurePosixPath(match.group(2)).name
        if name not in images:
            return match.group(0)
        data = base64.b64encode(images[name]).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = md.render(_IMAGE.sub(inline, markdown))
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:1em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>\n"
    )


# Few, comparable metric keys for every evaluated arm (MLflow's runs table and charts); the
# per-family, per-failure and per-baseline detail stays in the eval JSON and the comparison.
HEADLINE = {
    "tsr": "tsr",
    "tsr_ci_low": "tsr_ci_low",
    "tsr_ci_high": "tsr_ci_high",
    "steps_per_task": "steps_mean",
    "cost_per_task": "cost_per_task_usd",
    "n_tasks": "n",
}
HEADLINE_DELTAS = ("tsr_vs_floor", "tsr_vs_prompt_only", "tsr_vs_production")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def headline_metrics(
    block: Mapping[str, Any], delta: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """An arm's headline numbers under the same keys for every run, plus the candidate's TSR
    differences (`delta`) when given."""
    out = {k: float(block[src]) for k, src in HEADLINE.items() if _is_number(block.get(src))}
    for key in HEADLINE_DELTAS:
        if delta and _is_number(delta.get(key)):
            out[key] = float(delta[key])
    return out


COMPARISON_ORDER = ("base", "sft", "rlvr")


def read_evals(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """Every `eval_<model>.json` in `metrics_dir` in the evaluate stage's shape, by model."""
    import json

    evals: dict[str, dict[str, Any]] = {}
    for file in sorted(metrics_dir.glob("eval_*.json")):
        try:
            payload = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("candidate"), dict):
            evals[file.stem.removeprefix("eval_")] = payload
    return evals


def comparison_rows(
    evals: Mapping[str, Mapping[str, Any]], reference: str | None = None
) -> list[dict[str, Any]]:
    """Floor, prompt-only base, production and every evaluated model, one row each.

    `evals` maps model name to its eval JSON. The baselines come from `reference` (the newest
    evaluation, normally), evaluated models from their own files; `tasks` says whether each
    row counted the same number of held-out tasks.
    """
    if not evals:
        return []
    ref_name = reference if reference is not None and reference in evals else next(iter(evals))
    ref = evals[ref_name]
    rows: list[dict[str, Any]] = []
    baselines = (
        ("do-nothing floor", "baseline_floor"),
        ("prompt-only (base)", "baseline_prompt_only"),
        ("production logs", "baseline_production"),
    )
    for label, key in baselines:
        if isinstance(ref.get(key), Mapping):
            rows.append(_comparison_row(label, ref[key], f"eval_{ref_name}.json: {key}"))
    order = {name: i for i, name in enumerate(COMPARISON_ORDER)}
    for name in sorted(evals, key=lambda n: (order.get(n, len(order)), n)):
        block = evals[name].get("candidate")
        if name == "base" or not isinstance(block, Mapping):
            continue  # base's candidate is the prompt-only row
        rows.append(_comparison_row(name, block, f"eval_{name}.json"))
    floor = ref.get("baseline_floor")
    for row in rows:
        base = floor.get("tsr") if isinstance(floor, Mapping) else None
        row["tsr_over_floor"] = (
            row["tsr"] - base if _is_number(row["tsr"]) and _is_number(base) else None
        )
    return rows


def _comparison_row(arm: str, block: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {
        "arm": arm,
        "tsr": block.get("tsr"),
        "tsr_ci_low": block.get("tsr_ci_low"),
        "tsr_ci_high": block.get("tsr_ci_high"),
        "tasks": block.get("n"),
        "steps_per_task": block.get("steps_mean"),
        "cost_per_task_usd": block.get("cost_per_task_usd"),
        "source": source,
    }


def comparison_markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """The comparison as a markdown page (TSR with its 95% interval, gain over the floor)."""
    body = [
        [
            str(r["arm"]),
            _tsr_cell(
                {
                    "n": r.get("tasks"),
                    "tsr": r.get("tsr"),
                    "tsr_ci_low": r.get("tsr_ci_low"),
                    "tsr_ci_high": r.get("tsr_ci_high"),
                }
            ),
            "n/a" if r.get("tsr_over_floor") is None else f"{100 * r['tsr_over_floor']:+.1f} pts",
            _count(r.get("tasks")),
            _num(r.get("steps_per_task")),
            _num(r.get("cost_per_task_usd"), ".6f"),
            f"`{r['source']}`",
        ]
        for r in rows
    ]
    header = ["arm", "TSR [95% CI]", "over the floor", "tasks", "steps per task",
              "cost per task (USD)", "from"]  # fmt: skip
    return "\n".join(
        [
            "# Candidates beside both baselines and the floor",
            "",
            *_table(header, body),
            "",
            "Same held-out tasks for every row when `tasks` agree; intervals are Wilson 95%.",
            "",
        ]
    )
