"""Orchestration overhead: what the Prefect flow costs on top of the stages it runs, in one run.

On a fresh copy of the working tree (what `git clone` gives: tracked and not-ignored files, no
data, models or DVC cache), with a fresh PREFECT_HOME unless told otherwise:

1. the README's main command, `TRACETUNE_VENV=<this venv> scripts/dev.sh run`, timed from the
   outside (interpreter start, Prefect's temporary API start and stop, the flow, every stage);
2. from the run record the flow writes (`metrics/orchestration.json`): each stage's own time,
   measured around its `dvc repro --single-item` subprocess (the DVC pushes count as stages),
   and the flow's wall time;
3. with `--with-dvc`, the plain reference: `dvc repro` of the same pipeline on another fresh
   copy, no Prefect at all.

Overhead of the flow = (flow wall - stage time) / flow wall: what Prefect's tasks, state
tracking, logging, artifacts and the dvc.yaml read add while the pipeline runs. Overhead of the
command adds what happens before and after the flow (imports, the temporary API).

    .venv/bin/python bench/bench_orchestration.py              # the embedded default
    .venv/bin/python bench/bench_orchestration.py --tiny       # scaled-down params, seconds
    .venv/bin/python bench/bench_orchestration.py --with-dvc   # also the plain `dvc repro`

Both sides run as a plain user runs them: the same stage commands at torch's default threads
(unless params.yaml sets them), one after the other, never at the same time. The record
(bench/results/bench_orchestration.json) names both sides' settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record

REPO = Path(__file__).resolve().parents[1]
TARGET_SHARE = 0.05


def fresh_copy(dst: Path, src: Path = REPO) -> Path:
    """What `git clone` of the working tree gives, uncommitted edits included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (os.fsdecode(p) for p in listed)):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)  # a clone has no results yet
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def scale_down(root: Path) -> None:
    """The tests' tiny params (tests/integration/flow_support.py), for a quick look."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from flow_support import TINY

    from flows.retrain import override_params

    override_params(root / "params.yaml", TINY)


@contextlib.contextmanager
def shared_venv_for(clone: Path, venv: Path) -> Iterator[None]:
    """Let `scripts/dev.sh` in the copy use the shared venv as it is, then give it back.

    Its set-up stamp records the dependency files' hash and the checkout the editable install
    points at; from the copy it would re-run `pip install -e .` and point the shared venv at a
    temporary directory. While the copy runs, the stamp names the copy (same dependency files:
    the copy's equal the repository's), `bench_env` puts the copy first on PYTHONPATH, and the
    original stamp comes back afterwards. Set-up time is therefore not part of the figure.
    """
    stamp = venv / ".tracetune-installed"
    if not stamp.exists():
        raise SystemExit(f"{venv} is not set up: run scripts/dev.sh setup in {REPO} first")
    original = stamp.read_text()
    deps = original.split(" ", 1)[0]
    stamp.write_text(f"{deps} {clone}\n")
    try:
        yield
    finally:
        stamp.write_text(original)


def timed(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Wall seconds of a command; its output goes to `log` (it is long)."""
    started = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def bench_env(prefect_home: Path | None, clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(clone)  # the copy's code, not the editable install's checkout
    env["TRACETUNE_VENV"] = str(Path(sys.executable).parents[1])
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return env


def report(command_s: float, record: dict[str, Any], dvc_s: float | None) -> str:
    lines = [f"{'stage':<18} {'status':<11} {'seconds':>9}"]
    for stage in record["stages"]:
        if stage["status"] in {"ran", "up-to-date", "dispatched"}:
            lines.append(f"{stage['name']:<18} {stage['status']:<11} {stage['seconds']:>9.1f}")
    stage_s, flow_s = record["stage_s"], record["wall_s"]
    flow_share = (flow_s - stage_s) / flow_s
    cmd_share = (command_s - stage_s) / command_s
    verdict = "met" if flow_share <= TARGET_SHARE else "MISSED"
    lines += [
        "",
        f"stages (own time, sum of dvc repro/push subprocesses): {stage_s:8.1f} s",
        f"flow wall time:                                        {flow_s:8.1f} s",
        f"README command (scripts/dev.sh run) wall time:         {command_s:8.1f} s",
        f"orchestration overhead in the flow: {flow_s - stage_s:6.1f} s = "
        f"{100 * flow_share:4.1f}% (target <= {100 * TARGET_SHARE:.0f}%: {verdict})",
        f"overhead of the whole command:      {command_s - stage_s:6.1f} s = "
        f"{100 * cmd_share:4.1f}% (adds interpreter start, imports, Prefect's temporary API)",
    ]
    if dvc_s is not None:
        lines.append(
            f"plain `dvc repro` of the same pipeline: {dvc_s:7.1f} s; "
            f"README command / dvc repro = {command_s / dvc_s:.3f}"
        )
    return "\n".join(lines)


def figures(
    command_s: float, record: dict[str, Any], dvc_s: float | None, params: str
) -> list[Figure]:
    """The flow's overhead over its own stages, and the README command against `dvc repro`."""
    stage_s, flow_s = record["stage_s"], record["wall_s"]
    flow = f"the Prefect flow (scripts/dev.sh run), fresh copy, {params}, stage defaults"
    out = [
        Figure(
            name="orchestration overhead: flow wall time over its stages' own time",
            value=round(flow_s, 1),
            unit="s",
            ours=flow,
            reference="the same stages' own time (sum of their dvc repro/push subprocesses)",
            reference_value=round(stage_s, 1),
            ratio=round(flow_s / stage_s, 3),
            note=f"overhead {100 * (flow_s - stage_s) / flow_s:.1f}% of the flow "
            f"(target <= {100 * TARGET_SHARE:.0f}%); the whole command {command_s:.1f} s",
        )
    ]
    if dvc_s is not None:
        out.append(
            Figure(
                name="README command vs plain `dvc repro` of the same pipeline",
                value=round(command_s, 1),
                unit="s",
                ours=f"{flow}, timed from outside (imports, Prefect's temporary API included)",
                reference=f"`python -m dvc repro` on another fresh copy, {params}, no Prefect",
                reference_value=round(dvc_s, 1),
                ratio=round(command_s / dvc_s, 3),
                note="one run each, one after the other",
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' scaled-down params")
    parser.add_argument("--with-dvc", action="store_true", help="also time plain `dvc repro`")
    parser.add_argument(
        "--reuse-prefect-home",
        action="store_true",
        help="keep ~/.prefect (its database exists) instead of a fresh PREFECT_HOME",
    )
    parser.add_argument("--keep", action="store_true", help="keep the copies and logs")
    args = parser.parse_args(argv)
    record_ = start_record(
        "bench_orchestration", None if argv is None else ["bench_orchestration.py", *argv]
    )

    work = Path(tempfile.mkdtemp(prefix="tracetune-bench-orch-"))
    try:
        clone = fresh_copy(work / "clone")
        if args.tiny:
            scale_down(clone)
        home = None if args.reuse_prefect_home else work / "prefect-home"
        with shared_venv_for(clone, Path(sys.executable).parents[1]):
            command_s = timed(
                ["scripts/dev.sh", "run"], clone, bench_env(home, clone), work / "command.log"
            )
        record = json.loads((clone / "metrics" / "orchestration.json").read_text())
        dvc_s = None
        if args.with_dvc:
            plain = fresh_copy(work / "plain")
            if args.tiny:
                scale_down(plain)
            dvc_bin = str(Path(sys.executable).parent)
            env = bench_env(home, plain) | {"PATH": f"{dvc_bin}{os.pathsep}{os.environ['PATH']}"}
            dvc_s = timed([sys.executable, "-m", "dvc", "repro"], plain, env, work / "dvc.log")
        params = "tiny (tests)" if args.tiny else "embedded default (params.yaml)"
        print(f"orchestration benchmark: {params}, fresh copy at {clone}")
        print(f"load average after: {os.getloadavg()[0]:.1f} (CPU cores: {os.cpu_count()})")
        print(report(command_s, record, dvc_s))
        figs = figures(command_s, record, dvc_s, params)
        print_figures(figs)
        details = {"budget": f"one run of each side, params: {params}", "flow": record}
        print(f"record: {write_record(record_, figs, details)}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
