"""One JSON record per benchmark run, the single source of docs/benchmarks.md's generated table.

Why a shared record: a figure a skeptic can check needs its command, date, machine load and
thread settings beside it, and both sides' settings (ours and the plain reference's). Every
bench writes `bench/results/<bench>.json` through `write_record`; `bench/table.py` renders the
table from those files, and README quotes only figures that appear there.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Figure:
    """One headline number of a bench, with what it is compared against.

    `ours` and `reference` describe each side's settings in words a reader can reproduce
    (threads, batch, learning rate, ...); `ratio` is ours / reference where that is meaningful.
    """

    name: str
    value: float
    unit: str
    ours: str
    reference: str = ""
    reference_value: float | None = None
    ratio: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Record:
    """Where and how a bench ran: enough to judge whether its figures compare."""

    bench: str
    command: str
    started_utc: str
    load_average: tuple[float, float, float]
    threads: dict[str, str]
    cpus: int
    machine: str
    commit: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def thread_settings() -> dict[str, str]:
    """The thread knobs that change a CPU timing, as set (or 'default') in this process."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    out = {key: os.environ.get(key, "default") for key in keys}
    if "torch" in sys.modules:
        out["torch.get_num_threads"] = str(sys.modules["torch"].get_num_threads())
    return out


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    command = ["git", "-C", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def git_commit() -> str:
    """The commit measured, `+dirty` when the tree differs from it."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def start_record(bench: str, argv: list[str] | None = None) -> Record:
    """A record stamped now; call at the start so the load average is the run's, not after it."""
    args = sys.argv if argv is None else argv
    load = os.getloadavg()
    return Record(
        bench=bench,
        command=" ".join(shlex.quote(a) for a in ["python", *args]),
        started_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
        threads=thread_settings(),
        cpus=os.cpu_count() or 0,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        commit=git_commit(),
    )


def write_record(
    record: Record,
    figures: list[Figure],
    details: dict[str, Any] | None = None,
    out: Path | None = None,
) -> Path:
    """Write the record with its figures; the thread settings are re-read (torch is loaded now)."""
    threads = {**record.threads, **thread_settings()}
    body = asdict(record) | {"threads": threads, "details": details or {}}
    body["figures"] = [asdict(f) for f in figures]
    path = out or RESULTS_DIR / f"{record.bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def print_figures(figures: list[Figure]) -> None:
    """The bench's closing lines: each figure with both sides' settings, so output is fair alone."""
    for f in figures:
        ratio = f" = {f.ratio:.2f}x" if f.ratio is not None else ""
        ref = f" vs {f.reference_value:g} {f.unit}" if f.reference_value is not None else ""
        print(f"{f.name}: {f.value:g} {f.unit}{ref}{ratio}")
        print(f"    ours:      {f.ours}")
        if f.reference:
            print(f"    reference: {f.reference}")
        if f.note:
            print(f"    note:      {f.note}")
