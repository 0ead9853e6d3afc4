"""The real-weights profile's results as markdown: TSR (grounded and free decoding), steps, cost,
per family, against production and the floor, the gate's verdict, wall time per stage.

`python bench/real_weights_report.py RUN_DIR` where RUN_DIR is a repository copy that ran
`bench/real_weights.sh` (its `results/grounded` and `results/free` snapshots of `metrics/`).
Whatever is missing yet (a run still going) is left out, so it can be re-run as results arrive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODELS = ("base", "sft", "rlvr")
LABELS = {"base": "prompt-only SmolLM2-135M-Instruct", "sft": "SFT (LoRA)", "rlvr": "SFT + RLVR"}


def read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def tsr_cell(arm: dict[str, Any] | None) -> str:
    if not arm or arm.get("tsr") is None:
        return "n/a"
    return f"{arm['tsr']:.3f} [{arm['tsr_ci_low']:.3f}, {arm['tsr_ci_high']:.3f}]"


def floor(run: Path, families: list[str]) -> tuple[float, list[str]] | None:
    """The evaluated families whose golden trajectories never call a tool (and their share):
    all an agent that never calls a tool could solve (none: the floor is 0)."""
    train = run / "data" / "curated" / "train.jsonl"
    if not train.exists():
        return None
    calls: dict[str, list[int]] = {}
    for line in train.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            n = sum(len(m.get("tool_calls") or []) for m in row["messages"])
            calls.setdefault(row["family"], []).append(n)
    free = [f for f in families if calls.get(f) and max(calls[f]) == 0]
    return (len(free) / len(families) if families else 0.0), free


def main(run: Path) -> str:
    grounded = {m: read(run / "results" / "grounded" / f"eval_{m}.json") for m in MODELS}
    free = {m: read(run / "results" / "free" / f"eval_{m}.json") for m in MODELS}
    out = [
        "| model | TSR [95% CI], grounded | TSR [95% CI], free | steps / task | cost / task |",
        "|---|---|---|---:|---:|",
    ]
    production = None
    for m in MODELS:
        g, f = grounded[m], free[m]
        arm = (g or f or {}).get("candidate")
        if g:
            production = g.get("baseline_production")
        if arm is None:
            continue
        out.append(
            f"| {LABELS[m]} | {tsr_cell(g and g['candidate'])} | {tsr_cell(f and f['candidate'])}"
            f" | {fmt(arm.get('steps_mean'), 2)} | {fmt(arm.get('cost_per_task_usd'), 6)} |"
        )
    if production:
        out.append(
            f"| production agent (logged) | {tsr_cell(production)} | | "
            f"{fmt(production.get('steps_mean'), 2)} | "
            f"{fmt(production.get('cost_per_task_usd'), 6)} |"
        )
    families = sorted(
        {fam for d in (*grounded.values(), *free.values()) if d for fam in
         d["candidate"]["per_family"]}
    )  # fmt: skip
    low = floor(run, families) if families else None
    if low is not None:
        names = ", ".join(low[1]) or "none of the evaluated families"
        out += ["", f"Floor (never call a tool): families solvable so: {names}."]
    if families:
        cols = [
            (m, kind, d)
            for m in MODELS
            for kind, d in (("free", free[m]), ("grnd", grounded[m]))
            if d
        ]
        out += [
            "",
            "| family | n | " + " | ".join(f"{m} {k}" for m, k, _ in cols) + " | production |",
        ]
        out.append("|---|---:|" + "---:|" * len(cols) + "---:|")
        prod_fam = (production or {}).get("per_family", {})
        for fam in families:
            n = next(d["candidate"]["per_family"][fam]["n"] for _, _, d in cols
                     if fam in d["candidate"]["per_family"])  # fmt: skip
            cells = []
            for _, _, d in cols:
                pf = d["candidate"]["per_family"].get(fam)
                cells.append(str(round(pf["tsr"] * pf["n"])) if pf else "")
            out.append(
                f"| {fam} | {n} | "
                + " | ".join(cells)
                + f" | {fmt(prod_fam.get(fam, {}).get('tsr'), 2)} |"
            )
    sft, rlvr = read(run / "metrics" / "sft.json"), read(run / "metrics" / "rlvr.json")
    if sft:
        out += [
            "",
            "SFT: "
            + ", ".join(
                f"{k} {sft[k]}" for k in sorted(sft) if not isinstance(sft[k], dict | list)
            ),
        ]
    if rlvr:
        out += [
            "",
            "RLVR: "
            + ", ".join(
                f"{k} {rlvr[k]}" for k in sorted(rlvr) if not isinstance(rlvr[k], dict | list)
            ),
        ]
    register = read(run / "metrics" / "register.json")
    if register:
        out += ["", f"Gate: {register.get('verdict')}; failed: {register.get('failed')}"]
    orchestration = read(run / "metrics" / "orchestration.json")
    if orchestration:
        out += ["", "| stage | status | seconds |", "|---|---|---:|"]
        out += [
            f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in orchestration["stages"]
        ]
        out.append(f"| flow (wall) | | {orchestration.get('wall_s', 0):.0f} |")
    timings = run / "results" / "free" / "seconds.txt"
    if timings.exists():
        out += [
            "",
            "Free-decoding evaluations (seconds): "
            + timings.read_text().strip().replace("\n", ", "),
        ]
    return "\n".join(out)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
