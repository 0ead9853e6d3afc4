"""The evaluated models side by side, from the evaluate stages' metrics files (nothing re-runs).

`metrics/eval_<model>.json` holds everything one evaluation measured (~100 numbers per arm);
`dvc metrics show` over all of them printed one table 382 columns wide. DVC prints one row per
metrics file and one column per key, so the headline is one small file per arm with the same
six keys (`headline`): the table's rows are then base, SFT, RLVR, production and the floor, and
its columns read on one screen. The per-family TSRs with their intervals go to one plot file
(`family_rows`) instead of more columns.

Production and the floor are measured by every evaluation on the same held-out tasks; they are
taken from the first model's file, and files whose task counts disagree are refused: arms
measured on different task sets do not belong side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tracetune.evaluation.metrics import ROUND, wilson_interval

# The arms every evaluation file carries besides its candidate, and their headline names.
BASELINES = {"baseline_production": "production", "baseline_floor": "floor"}
ALL_FAMILIES = "(all)"


def headline(block: Mapping[str, Any]) -> dict[str, Any]:
    """One arm's row of `dvc metrics show`: short keys, every arm the same ones."""
    return {
        "tsr": block.get("tsr"),
        "tsr_low": block.get("tsr_ci_low"),
        "tsr_high": block.get("tsr_ci_high"),
        "n": block.get("n", 0),
        "steps": block.get("steps_mean"),
        "cost_usd": block.get("cost_per_task_usd"),
    }


def side_by_side(payloads: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Arm name -> metrics block: each model's candidate, then production and the floor.

    `payloads`: model name -> its `metrics/eval_<model>.json`, in the order wanted."""
    if not payloads:
        raise ValueError("no evaluation to compare: name at least one model")
    counts = {model: payload.get("n_tasks") for model, payload in payloads.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"evaluations on different held-out task counts cannot sit side by side: {counts} "
            "(re-run the evaluate stages with the same params: `dvc repro`)"
        )
    arms: dict[str, Mapping[str, Any]] = {}
    for model, payload in payloads.items():
        if "candidate" not in payload:
            raise ValueError(f"metrics of {model!r} have no `candidate` block: not an evaluation")
        arms[model] = payload["candidate"]
    first = next(iter(payloads.values()))
    for key, name in BASELINES.items():
        if name in arms:
            raise ValueError(f"a model may not be called {name!r}: it names a baseline arm")
        if key in first:
            arms[name] = first[key]
    return arms


def _row(family: str, arm: str, tsr: float | None, n: int) -> dict[str, Any]:
    low, high = wilson_interval(round((tsr or 0.0) * n), n)
    return {
        "family": family,
        "arm": arm,
        "tsr": tsr,
        "tsr_low": round(low, ROUND),
        "tsr_high": round(high, ROUND),
        "n": n,
    }


def family_rows(arms: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plot rows (family, arm, tsr, 95% Wilson bounds, n): every arm overall, then per family.

    Families an arm never saw (production logs may lack some) are left out, not drawn as 0."""
    rows = []
    for arm, block in arms.items():
        if block.get("n"):
            rows.append(_row(ALL_FAMILIES, arm, block.get("tsr"), int(block["n"])))
    for family in _families(arms.values()):
        for arm, block in arms.items():
            entry = block.get("per_family", {}).get(family)
            if entry and entry.get("n"):
                rows.append(_row(family, arm, entry.get("tsr"), int(entry["n"])))
    return rows


def _families(blocks: Iterable[Mapping[str, Any]]) -> list[str]:
    names: set[str] = set()
    for block in blocks:
        names.update(block.get("per_family", {}))
    return sorted(names)
