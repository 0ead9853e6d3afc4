"""What people read at the end of a stage or a run: tables (by hand), short lines (the main job)."""

from __future__ import annotations

from typing import Any


def print_simulation_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title="Simulated production logs (the production baseline)")
    head.add_column("metric")
    head.add_column("value", justify="right")
    for key in (
        "lines",
        "trajectories",
        "corrupt_lines",
        "tsr",
        "steps_per_task",
        "cost_per_task_usd",
        "seconds",
    ):
        head.add_row(key, str(summary.get(key)))
    console.print(head)
    fam = Table(title="TSR per task family")
    fam.add_column("family")
    fam.add_column("tsr", justify="right")
    for name, tsr in summary["tsr_per_family"].items():
        fam.add_row(name, f"{tsr:.3f}")
    console.print(fam)
    faults = Table(title="Injected fault rates (per session)")
    faults.add_column("fault")
    faults.add_column("rate", justify="right")
    for name, rate in summary["fault_rates"].items():
        faults.add_row(name, f"{rate:.3f}")
    console.print(faults)
    console.print("files: " + ", ".join(summary["files"]))


def simulation_lines(summary: dict[str, Any]) -> list[str]:
    """The simulate stage's summary in a few lines (the tables are `tracetune simulate-logs`'s)."""
    from tracetune.console import num

    families = summary.get("tsr_per_family") or {}
    low = sorted(families.items(), key=lambda kv: kv[1])[:3]
    return [
        f"simulated {summary.get('trajectories')} production trajectories in "
        f"{len(summary.get('files') or [])} files ({summary.get('corrupt_lines')} corrupt lines): "
        f"TSR {num(summary.get('tsr'))}, {num(summary.get('steps_per_task'))} steps/task, "
        f"${num(summary.get('cost_per_task_usd'))}/task, {num(summary.get('seconds'))} s",
        "  weakest families: " + ", ".join(f"{name} {num(tsr)}" for name, tsr in low),
    ]
