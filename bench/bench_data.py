"""Benchmark: ingest + raw-batch GX gate + curation + curated-set GX gate, throughput and memory.

    python bench/bench_data.py                                  # 100k and 300k, 2 workers
    python bench/bench_data.py --sizes 1000000                  # the 1M run
    python bench/bench_data.py --compare /tmp/base_wt --compare-sizes 100000   # vs another tree

Logs: 20,000 episodes are simulated once (4 seeds, ~1% corrupt lines); line i is a variant of
episode i mod 20,000 (`render`): its ids (order, customer, product) and the email's local part
take letters unique to the line, and its trajectory id, timestamp and latency change with the
variant number, so exact and near-duplicate removal keep every golden one (even where the
simulator solved one task twice the same way) and the PII scrub sees new values. The
generator is not timed. Each run is a fresh process (`--child`); memory is the peak of the SUM
of resident memory over the main process and its worker processes, sampled every 0.1 s (RSS
counts pages shared with the forked workers once per process; PSS, also reported, splits them).

`--compare TREE` runs the same measurement with TREE's code (`PYTHONPATH=TREE`) on the same
logs, interleaved with ours (ours, TREE, ours, TREE, ...), and reports medians. The reference in
every run is the plain floor: one process reading every line and `json.loads`-ing it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

DISTINCT_PER_SEED = 5000
SEEDS = (100, 101, 102, 103)
STAGES = ("ingest", "raw_gate", "curate", "curated_gate")
# A fixed pseudonym key, so that two trees' outputs on the same logs compare byte for byte.
BENCH_KEY = b"tracetune-bench-data-fixed-key-0123456789abcdef"

_TID = re.compile(r'"trajectory_id": "([^"]*)"')
_TIMESTAMP = re.compile(r'"timestamp": "([^"]*)"')
_ID = re.compile(r"\b([OCP])-(\d+)\b")
_EMAIL = re.compile(r"([a-z]+\.[a-z]+)(\d+)@")
_LATENCY = re.compile(r'"latency_s": ([0-9.]+)')
_USER = re.compile(r'("role": "user", "content": ")')


def _simulate(seed: int) -> list[str]:
    from tracetune.config import parse_params
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": DISTINCT_PER_SEED, "seed": seed}})
    return [line for line, _, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate)]


def _letters(n: int) -> str:
    """`n` >= 1 as letters (1 -> A, 26 -> Z, 27 -> AA): a suffix that adds no digits, so the
    PII scrub's number detectors (phones, cards, SSNs) see what they saw in the episode."""
    out = ""
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(65 + r) + out
    return out


def vary(line: str, variant: int) -> str:
    """A distinct trajectory from a simulated one: variant 0 is the line itself.

    Order, customer and product ids take a letter suffix, as does an email's local part
    (consistently through the whole line: task id, question, tool arguments and results, answer);
    the trajectory id (`tr-100-000042` -> `tr-100-000042-7`, the simulator's shape), timestamp
    (+ variant minutes) and latency change too. An episode with no
    id (a policy question) gets a customer reference in its first user turn. A corrupt line
    stays corrupt.
    """
    return render(template(line), variant)


Template = list[tuple[str, str]]  # (kind, text): kind "" is kept as is


def template(line: str) -> Template:
    """`line` cut where a variant differs, found once per simulated line (rendering is cheap)."""
    spans = []
    for kind, pattern in (("tid", _TID), ("ts", _TIMESTAMP), ("lat", _LATENCY)):
        if m := pattern.search(line):
            spans.append((m.start(1), m.end(1), kind))
    ids = [(m.start(), m.end(), "id") for m in _ID.finditer(line)]
    if not ids and (m := _USER.search(line)):
        ids = [(m.end(1), m.end(1), "user")]
    spans += ids + [(m.start(), m.end(1) + len(m[2]), "email") for m in _EMAIL.finditer(line)]
    out: Template = []
    at = 0
    for start, end, kind in sorted(spans):
        if start < at:
            continue  # overlapping matches (none in simulated logs): keep the first
        out += [("", line[at:start]), (kind, line[start:end])]
        at = end
    return [*out, ("", line[at:])]


def render(parts: Template, variant: int, unique: int = 0) -> str:
    """Variant `variant` of a templated line; its ids and emails carry the letters of `unique`
    (default: of `variant`), so that lines given different `unique` numbers never repeat an
    episode, not even one the simulator logged twice (the same task solved the same way)."""
    if not variant and not unique:
        return "".join(text for _, text in parts)
    tag = _letters(unique or variant)
    edit = {
        "": lambda t: t,
        "tid": lambda t: f"{t}-{variant}" if variant else t,
        "ts": lambda t: _shift(t, variant) if variant else t,
        "lat": lambda t: f"{float(t) + variant / 1000:.3f}" if variant else t,
        "id": lambda t: t + tag,
        "email": lambda t: t + tag.lower(),
        "user": lambda t: f"(customer C-{unique or variant}) ",
    }
    return "".join(edit[kind](text) for kind, text in parts)


def _shift(stamp: str, variant: int) -> str:
    try:
        return (datetime.fromisoformat(stamp) + timedelta(minutes=variant)).isoformat()
    except ValueError:
        return stamp


def make_logs(n: int, cache: Path, workers: int) -> Path:
    """`n` distinct trajectories' log lines in 4 files under cache/distinct-n (made once)."""
    out = cache / f"unique-{n}"
    if (out / "done").exists():
        return out
    base_file = cache / "simulated-20000.jsonl"
    if not base_file.exists():
        with ProcessPoolExecutor(workers) as pool:
            lines = [line for part in pool.map(_simulate, SEEDS) for line in part]
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base_file.write_text("".join(line + "\n" for line in lines))
    base = [template(line) for line in base_file.read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    handles = [(out / f"logs-{k:02d}.jsonl").open("w") for k in range(4)]
    for i in range(n):
        variant, index = divmod(i, len(base))
        handles[i * 4 // n].write(render(base[index], variant, i + 1) + "\n")
    for handle in handles:
        handle.close()
    (out / "done").write_text("ok")
    return out


# ---------------------------------------------------------------------------------------------
# The measured run (a child process).
# ---------------------------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children): user + system CPU seconds so far. Workers are
    reaped when each stage's pool closes, so a stage's difference is that stage's CPU."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _digest(*files: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


class MemorySampler:
    """Peak of the summed RSS and PSS of this process and all its descendants."""

    def __init__(self, every: float = 0.1) -> None:
        import psutil

        self.me = psutil.Process()
        self.every = every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        rss = pss = 0
        procs = [self.me, *self.me.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info()
                rss += info.rss
                pss += info.pss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _reference(logs: Path) -> tuple[int, float]:
    started = time.perf_counter()
    n = 0
    for file in sorted(logs.glob("*.jsonl")):
        with file.open() as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    json.loads(line)
                n += 1
    return n, time.perf_counter() - started


def _curated_rows(curated: Path, heldout_fraction_params: Any) -> Any:
    """The curated gate's rows as the split + validate_curated stages make them (split by the
    seeded task hash; PII re-checked; exact content hash per row)."""
    import orjson

    from tracetune.data.features import curated_row
    from tracetune.trajectories.curation import exact_key
    from tracetune.trajectories.pii import pii_in
    from tracetune.trajectories.split import is_heldout

    with curated.open("rb") as handle:
        for n, line in enumerate(handle, 1):
            record = orjson.loads(line)
            task, family = str(record.get("task_id")), str(record.get("family"))
            split = "heldout" if is_heldout(task, family, heldout_fraction_params) else "train"
            frozen: frozenset[str] = frozenset()
            yield curated_row(record, split, exact_key(record), frozen, len(pii_in(record)), n)


def run_once(logs: Path, workers: int) -> dict[str, Any]:
    """One measured run: the reference, then ingest -> raw gate -> curate -> curated gate."""
    from tracetune.config import (
        CuratedGateParams,
        CurateParams,
        IngestParams,
        RawGateParams,
        SplitParams,
    )
    from tracetune.data.features import CURATED_COLUMNS, RAW_COLUMNS, raw_rows
    from tracetune.data.gates import curated_checks, raw_checks, run_gate, utc_now
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories import ingest as ingest_module
    from tracetune.trajectories.curation import curate
    from tracetune.trajectories.io import iter_lines

    n_ref, reference_s = _reference(logs)
    env = SupportDesk()
    known = frozenset(env.tool_names())
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    main_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, MemorySampler() as memory:
        root = Path(tmp)
        paths = ingest_module.IngestPaths(
            root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "r"
        )
        kwargs: dict[str, Any] = {}
        if "key" in inspect.signature(ingest_module.ingest).parameters:
            from tracetune.trajectories.pii import PiiKey

            kwargs["key"] = PiiKey(BENCH_KEY, "benchmark: a fixed key (outputs compare by digest)")
        mark = (time.perf_counter(), cpu_seconds())

        def lap(stage: str) -> None:
            nonlocal mark
            now = (time.perf_counter(), cpu_seconds())
            seconds[stage] = now[0] - mark[0]
            cpu[stage] = sum(now[1]) - sum(mark[1])
            main_cpu[stage] = now[1][0] - mark[1][0]
            mark = now

        report = ingest_module.ingest(
            IngestParams(source=str(logs), workers=workers), paths, **kwargs
        )
        lap("ingest")
        batch_file = next(paths.batches.glob("*.jsonl"))
        with batch_file.open("rb") as batch:
            raw = run_gate(
                "raw",
                raw_checks(RawGateParams(), known, utc_now()),
                RAW_COLUMNS,
                raw_rows(batch, known, workers),
                root / "docs-raw",
            )
        lap("raw_gate")
        curated_file = root / "curated.jsonl"
        with curated_file.open("w") as out:
            curated = curate(iter_lines(paths.batches), CurateParams(workers=workers), out, workers)
        lap("curate")
        gate = run_gate(
            "curated",
            curated_checks(CuratedGateParams(), env.families(), True),
            CURATED_COLUMNS,
            _curated_rows(curated_file, SplitParams()),
            root / "docs-curated",
            index_columns=("trajectory_id", "split", "line"),
        )
        lap("curated_gate")
        quarantine = sorted(paths.quarantine.glob("*.jsonl"))
        outputs = {
            "batch_bytes": batch_file.stat().st_size,
            "quarantine_bytes": sum(p.stat().st_size for p in quarantine),
            "curated_bytes": curated_file.stat().st_size,
            "batch_sha256": _digest(batch_file),
            "quarantine_sha256": _digest(*quarantine),
            "curated_sha256": _digest(curated_file),
            "curate_report": curated.as_dict() | {"seconds": None},
        }
    n = report.read
    total_s, total_cpu = sum(seconds.values()), sum(cpu.values())
    three = ("ingest", "raw_gate", "curate")  # issue 18's figure: the stages it measured
    return {
        "lines": n,
        "accepted": report.accepted,
        "quarantined": report.quarantined,
        "kept": curated.kept,
        "raw_gate_passed": raw.success,
        "curated_gate_passed": gate.success,
        "outputs": outputs,
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(total_s, 2)},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()} | {"total": round(total_cpu, 2)},
        "main_process_cpu_s": {k: round(v, 2) for k, v in main_cpu.items()},
        "cpu_us_per_trajectory": {k: round(v / n * 1e6, 1) for k, v in cpu.items()}
        | {
            "total": round(total_cpu / n * 1e6, 1),
            "ingest+raw_gate+curate": round(sum(cpu[k] for k in three) / n * 1e6, 1),
        },
        "per_s": {k: round(n / v) for k, v in seconds.items()}
        | {"pipeline": round(n / total_s), "reference_json_loads": round(n_ref / reference_s)},
        "slowest_stage": max(seconds, key=seconds.__getitem__),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "memory_mb": {
            "peak_rss_sum": round(memory.peak_rss / 2**20, 1),
            "peak_pss_sum": round(memory.peak_pss / 2**20, 1),
            "processes": memory.peak_processes,
            "main_maxrss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
    }


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------
def _child(tree: Path, logs: Path, workers: int, nice: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(logs)]
    cmd += ["--workers", str(workers)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    env = os.environ | {"GX_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total CPU (a whole run, so its columns belong together)."""
    ordered = sorted(runs, key=lambda r: r["cpu_s"]["total"])
    return ordered[(len(ordered) - 1) // 2]


def _row(label: str, r: dict[str, Any]) -> str:
    s, us, mem = r["per_s"], r["cpu_us_per_trajectory"], r["memory_mb"]
    return (
        f"{label:<18} {r['lines']:>8} {s['ingest']:>8} {s['raw_gate']:>8} {s['curate']:>8} "
        f"{s['curated_gate']:>8} {s['pipeline']:>9} {s['reference_json_loads']:>8} "
        f"{us['ingest']:>6} {us['raw_gate']:>6} {us['curate']:>6} {us['curated_gate']:>6} "
        f"{us['total']:>6} {us['ingest+raw_gate+curate']:>7} {mem['peak_rss_sum']:>8} "
        f"{mem['peak_pss_sum']:>8} {r['kept']:>7} {r['slowest_stage']:>12} "
        f"{r['load_average_1m']:>5}"
    )


HEADER = (
    f"{'run':<18} {'lines':>8} {'ing/s':>8} {'rawG/s':>8} {'cur/s':>8} {'curG/s':>8} "
    f"{'pipe/s':>9} {'json/s':>8} {'us:ing':>6} {'rawG':>6} {'cur':>6} {'curG':>6} {'total':>6} "
    f"{'3-stage':>7} {'RSS sum':>8} {'PSS sum':>8} {'kept':>7} {'slowest':>12} {'load':>5}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per size (and per tree)")
    parser.add_argument("--compare", type=Path, help="another tree, run interleaved with ours")
    parser.add_argument(
        "--compare-sizes", type=int, nargs="+", help="sizes the other tree runs at (default all)"
    )
    parser.add_argument("--nice", type=int, default=0, help="run the children under nice -n")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "tracetune-bench"
    )
    parser.add_argument("--out", type=Path, help="the record (default bench/results/...)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child, args.workers)))
        return
    from _record import Figure, print_figures, start_record, write_record

    record = start_record("bench_data")
    trees = {"ours": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in trees}
    print(HEADER, flush=True)
    for n in args.sizes:
        logs = make_logs(n, args.cache, max(1, args.workers))
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                if name == "compare" and args.compare_sizes and n not in args.compare_sizes:
                    continue
                r = _child(tree, logs, args.workers, args.nice)
                runs[name].setdefault(str(n), []).append(r)
                print(_row(f"{name} ({round_ + 1})", r), flush=True)
    figures = _figures(runs, args, Figure)
    medians = {t: {n: _median_run(rs) for n, rs in by.items()} for t, by in runs.items()}
    details = {"runs": runs, "median_runs": medians, "trees": {k: str(v) for k, v in trees.items()}}
    print()
    print_figures(figures)
    print(f"\nrecord: {write_record(record, figures, details, args.out)}")


def _same_outputs(runs: list[dict[str, Any]]) -> bool:
    keys = ("lines", "accepted", "quarantined", "kept", "outputs")
    return len({json.dumps([r[k] for k in keys], sort_keys=True) for r in runs}) == 1


def _figures(runs: dict[str, Any], args: argparse.Namespace, figure: Any) -> list[Any]:
    ours_setting = (
        f"ingest (PII scrub, schema, quarantine) -> raw GX gate -> curate -> curated GX gate, "
        f"{args.workers} worker processes + the main process, distinct simulated trajectories"
    )
    ref_setting = "one process: read every line and json.loads it (nothing else), same logs"
    figures = []
    for n, rs in runs["ours"].items():
        r = _median_run(rs)
        loads = ", ".join(str(x["load_average_1m"]) for x in rs)
        note = (
            f"median of {len(rs)} run(s); load average {loads} (shared machine: wall rates are"
            f" under load); slowest stage {r['slowest_stage']}; kept {r['kept']} of {r['lines']}"
        )
        figures.append(
            figure(
                f"pipeline throughput, {int(n):,} trajectories",
                r["per_s"]["pipeline"],
                "trajectories/s (wall)",
                ours_setting,
                ref_setting,
                r["per_s"]["reference_json_loads"],
                round(r["per_s"]["pipeline"] / r["per_s"]["reference_json_loads"], 3),
                note,
            )
        )
        figures.append(
            figure(
                f"CPU per trajectory, {int(n):,}",
                r["cpu_us_per_trajectory"]["total"],
                "CPU us/trajectory (all 4 stages, all processes)",
                ours_setting
                + "; per stage: "
                + ", ".join(f"{k} {r['cpu_us_per_trajectory'][k]}" for k in STAGES),
                note=note,
            )
        )
        figures.append(
            figure(
                f"peak memory, {int(n):,}",
                r["memory_mb"]["peak_rss_sum"],
                "MB (peak of the RSS summed over all processes)",
                ours_setting + f"; PSS sum {r['memory_mb']['peak_pss_sum']} MB",
                note=note,
            )
        )
        if "compare" in runs and n in runs["compare"]:
            ours_us = statistics.median(x["cpu_us_per_trajectory"]["total"] for x in rs)
            theirs = runs["compare"][n]
            their_us = statistics.median(x["cpu_us_per_trajectory"]["total"] for x in theirs)
            figures.append(
                figure(
                    f"CPU per trajectory vs {args.compare}, {int(n):,}",
                    ours_us,
                    "CPU us/trajectory (median, 4 stages)",
                    ours_setting,
                    f"the same bench and logs with {args.compare}'s code, interleaved",
                    their_us,
                    round(ours_us / their_us, 3),
                    f"{len(rs)} rounds each; outputs (batch, quarantine, curated file digests, "
                    f"curation report) identical: {_same_outputs(rs + theirs)}",
                )
            )
    return figures


if __name__ == "__main__":
    main()
