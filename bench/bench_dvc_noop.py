"""`dvc repro` with nothing changed: how long it takes and where the time goes.

The target (issue 22): a no-op `dvc repro` of the whole pipeline in at most 3 s on the 2-core
machine. It needs a pipeline state: either an existing repository whose pipeline has run
(`--repo`), or a fresh copy of the working tree with the tests' tiny params, run once with
`dvc repro` first (`--build`, a few minutes: every stage with a tiny model).

Measured, each `--repeat` times (median and min reported):

1. `python -c pass` and `python -c "import dvc.repo"`: interpreter start and DVC's imports;
2. `dvc status` and `dvc repro` with nothing to do (the first after the build is reported
   apart: DVC's state database may still be filling);
3. one `dvc repro` under cProfile: the functions with the most cumulative time, to say what a
   no-op costs (imports, reading dvc.yaml/params.yaml, hashing dependencies, git, locks).

    .venv/bin/python bench/bench_dvc_noop.py --build              # fresh copy, tiny params
    .venv/bin/python bench/bench_dvc_noop.py --repo PATH          # a repository already run
    .venv/bin/python bench/bench_dvc_noop.py --repo PATH --json out.json

The load of the machine matters more than anything DVC does (the figures in docs/benchmarks.md
say what the load average was); run it on a quiet machine to compare with the target. Every
command runs as a plain user runs it (one `python -m dvc` process, nothing tuned); the record
(bench/results/bench_dvc_noop.json) sets the no-op against the floor no DVC command can go
under: the interpreter start and DVC's imports, measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 3.0
# A full pipeline the no-op can check, minutes not hours: the tests' tiny params, RLVR on.
BUILD_OVERRIDES: dict[str, Any] = {
    "rlvr.mode": "always",
    "rlvr.steps": 2,
    "rlvr.n_tasks": 8,
    "rlvr.group_size": 2,
    "rlvr.tasks_per_step": 1,
    "registry.gate.min_tsr": 0.0,
}


def stage_env(root: Path) -> dict[str, str]:
    """Stage commands call `python`: this venv's, importing the repository's own code."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def timed(argv: list[str], root: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child: user + system, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, cpu, done.stdout


def build(work: Path) -> Path:
    """A fresh copy of the working tree with the tiny params, every stage run once."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from flow_support import tiny_repo

    root = tiny_repo(work / "repo", BUILD_OVERRIDES)
    (root / "dvc.lock").unlink(missing_ok=True)  # a clone has no results yet
    env = stage_env(root)
    print(f"building the pipeline state in {root} (dvc repro, every stage) ...", flush=True)
    seconds, _, _ = timed([sys.executable, "-m", "dvc", "repro"], root, env)
    print(f"  built in {seconds:.0f} s", flush=True)
    return root


def series(argv: list[str], root: Path, env: dict[str, str], repeat: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu, out = timed(argv, root, env)
        if "Running stage" in out:
            raise SystemExit(f"{' '.join(argv)} ran a stage: the pipeline is not up to date\n{out}")
        walls.append(wall)
        cpus.append(cpu)
    return {
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_min_s": round(min(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
    }


# Where a no-op's time goes: (label, file suffix, function) of DVC's own entry points. The rows
# overlap (reading params.yaml parses YAML, the index parses dvc.yaml with interpolation).
PARTS = (
    ("imports (all modules)", "<frozen importlib._bootstrap>", "_find_and_load"),
    ("YAML parsing (dvc.yaml, dvc.lock, params.yaml)", "serialize/_yaml.py", "parse_yaml"),
    ("params.yaml read per stage with `params:`", "dependency/param.py", "read_params"),
    ("${...} interpolation expressions", "parsing/interpolate.py", "parse_expr"),
    ("stage index from dvc.yaml + dvc.lock", "repo/index.py", "from_repo"),
    ("dependency checks (hashes from the state db)", "stage/__init__.py", "changed_deps"),
    ("output checks", "stage/__init__.py", "changed_outs"),
    ("read/write locks per stage", "dvc/rwlock.py", "rwlock"),
)
RUNNER = """
import cProfile, runpy, sys, time
sys.argv = ["dvc", "repro"]
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    runpy.run_module("dvc", run_name="__main__")
except SystemExit:
    pass
profiler.disable()
profiler.dump_stats(OUT)
"""


def profile(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """CPU-time profile of one no-op `dvc repro`: each part's share of the profiled total
    (the profiler slows every call, so shares, not seconds, carry over to a plain run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "repro.prof"
        timed([sys.executable, "-c", RUNNER.replace("OUT", repr(str(out)))], root, env)
        stats = pstats.Stats(str(out))
    entries = stats.stats  # type: ignore[attr-defined]
    total = max(cum for (_, _, _, cum, _) in entries.values())
    parts = {}
    for label, suffix, function in PARTS:
        cum = sum(
            row[3]
            for (path, _, name), row in entries.items()
            if name == function and path.endswith(suffix)
        )
        parts[label] = round(cum / total, 3)
    return {"profiled_cpu_s": round(total, 3), "share": parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", type=Path, help="a repository whose pipeline has run")
    source.add_argument("--build", action="store_true", help="a fresh tiny copy, run once")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the built copy")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tracetune-bench-dvc-"))
    try:
        root = build(work) if args.build else args.repo.resolve()
        # Stamped after the build: the load average is the measurement's, not the build's.
        command = None if argv is None else ["bench_dvc_noop.py", *argv]
        record = start_record("bench_dvc_noop", command)
        env = stage_env(root)
        first, first_cpu, _ = timed([sys.executable, "-m", "dvc", "repro"], root, env)
        py = [sys.executable]
        results: dict[str, Any] = {
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "first_noop_repro": {"wall_s": round(first, 3), "cpu_s": round(first_cpu, 3)},
            "python_start": series([*py, "-c", "pass"], root, env, args.repeat),
            "import_dvc_repo": series([*py, "-c", "import dvc.repo"], root, env, args.repeat),
            "dvc_status": series([*py, "-m", "dvc", "status"], root, env, args.repeat),
            "dvc_repro": series([*py, "-m", "dvc", "repro"], root, env, args.repeat),
            "profile": profile(root, env),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.build:
            print(f"kept {work}")
    print(json.dumps(results, indent=1))
    repro = results["dvc_repro"]
    verdict = "met" if repro["wall_median_s"] <= TARGET_S else "MISSED"
    print(
        f"no-op dvc repro: wall median {repro['wall_median_s']:.2f} s (target <= {TARGET_S:.0f} s: "
        f"{verdict}), CPU {repro['cpu_median_s']:.2f} s, "
        f"load average {results['load_average'][0]:.1f} on {results['cpus']} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    state = "a fresh copy with the tests' tiny params" if args.build else str(args.repo)
    figs = figures(results, args.repeat, state)
    print_figures(figs)
    details = {
        "budget": f"{args.repeat} runs per command on {state}",
        "results": results,
    }
    print(f"record: {write_record(record, figs, details)}")


def figures(results: dict[str, Any], repeat: int, source: str) -> list[Figure]:
    """The no-op against its floor (interpreter + DVC's imports), and `dvc status` beside it."""
    floor = results["import_dvc_repo"]["wall_median_s"]
    plain = f"one process, default threads, median of {repeat}, pipeline state: {source}"
    verdict = "met" if results["dvc_repro"]["wall_median_s"] <= TARGET_S else "missed"
    out = []
    for key, command in (("dvc_repro", "dvc repro"), ("dvc_status", "dvc status")):
        row = results[key]
        out.append(
            Figure(
                name=f"no-op `{command}` wall time",
                value=row["wall_median_s"],
                unit="s",
                ours=f"`python -m dvc {command.split()[1]}`, nothing changed; {plain}",
                reference=f'floor: `python -c "import dvc.repo"`; {plain}',
                reference_value=floor,
                ratio=round(row["wall_median_s"] / floor, 2),
                note=f"CPU {row['cpu_median_s']} s, min {row['wall_min_s']} s"
                + (f"; target <= {TARGET_S:g} s: {verdict}" if key == "dvc_repro" else ""),
            )
        )
    return out


if __name__ == "__main__":
    main()
