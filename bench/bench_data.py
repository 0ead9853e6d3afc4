"""Benchmark: ingest + raw-batch GX gate + curation throughput and peak memory.

    .venv/bin/python bench/bench_data.py                 # 10k and 100k, 2 workers
    .venv/bin/python bench/bench_data.py --sizes 20000 --workers 1

Logs are simulated once (distinct episodes from several seeds, then copied under new ids and
later timestamps up to the wanted size: copies are what re-logged sessions look like, and curation
removes them as duplicates) and cached under --cache. Each size runs in a fresh process, so its
peak RSS is its own; "reference" is the plain floor in the same run: reading and `json.loads` of
every line, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

DISTINCT_PER_SEED = 5000


def _simulate(seed: int) -> list[str]:
    from tracetune.config import parse_params
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": DISTINCT_PER_SEED, "seed": seed}})
    return [line for line, _, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate)]


def make_logs(n: int, cache: Path, workers: int) -> Path:
    """`n` log lines in 4 files under cache/n, simulated once."""
    out = cache / str(n)
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(100, 100 + max(1, min(4, -(-n // DISTINCT_PER_SEED)))))
    with ProcessPoolExecutor(workers) as pool:
        distinct = [line for lines in pool.map(_simulate, seeds) for line in lines]
    handles = [(out / f"logs-{k:02d}.jsonl").open("w") for k in range(4)]
    for i in range(n):
        copy, base = divmod(i, len(distinct))
        line = distinct[base]
        if copy:
            line = _recopy(line, copy)
        handles[i * 4 // n].write(line + "\n")
    for handle in handles:
        handle.close()
    (out / "done").write_text("ok")
    return out


def _recopy(line: str, copy: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line  # a corrupt line stays corrupt
    if not isinstance(record, dict) or not isinstance(record.get("timestamp"), str):
        return line
    record["trajectory_id"] = f"{record['trajectory_id']}-c{copy}"
    when = datetime.fromisoformat(record["timestamp"]) + timedelta(hours=copy)
    record["timestamp"] = when.isoformat()
    return json.dumps(record, ensure_ascii=False)


def cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children): user + system CPU seconds so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"main": round(self_kb / 1024, 1), "workers": round(kids_kb / 1024, 1)}


def run_once(logs: Path, workers: int) -> dict[str, Any]:
    """One measured run (in its own process): reference, then ingest -> gate -> curate."""
    from tracetune.config import CurateParams, IngestParams, RawGateParams
    from tracetune.data.features import RAW_COLUMNS, raw_rows
    from tracetune.data.gates import raw_checks, run_gate, utc_now
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.curation import curate
    from tracetune.trajectories.ingest import IngestPaths, ingest
    from tracetune.trajectories.io import iter_lines
    from tracetune.trajectories.pii import PiiKey

    started = time.perf_counter()
    n_ref = 0
    for file in sorted(logs.glob("*.jsonl")):
        with file.open() as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    json.loads(line)
                n_ref += 1
    reference_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = IngestPaths(root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "r")
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        key = PiiKey(secrets.token_hex(32).encode(), "benchmark: a random key")
        report = ingest(IngestParams(source=str(logs), workers=workers), paths, key=key)
        t1 = time.perf_counter()
        known = frozenset(SupportDesk().tool_names())
        batch = next(paths.batches.glob("*.jsonl")).open("rb")
        rows = raw_rows(batch, known, workers)
        gate = run_gate(
            "raw", raw_checks(RawGateParams(), known, utc_now()), RAW_COLUMNS, rows, root / "docs"
        )
        t2 = time.perf_counter()
        batch.close()
        with (root / "curated.jsonl").open("w") as out:
            curated = curate(iter_lines(paths.batches), CurateParams(workers=workers), out, workers)
        t3 = time.perf_counter()
        c3 = cpu_seconds()
    n = report.read
    total = t3 - t0
    main_cpu, kids_cpu = c3[0] - c0[0], c3[1] - c0[1]
    # What 2 free cores would do: the CPU work spread over 2 cores, but never faster than the
    # main process's own (serial) share. The machine is shared, so wall-clock figures vary.
    free_2core_s = max((main_cpu + kids_cpu) / 2, main_cpu)
    return {
        "lines": n,
        "accepted": report.accepted,
        "quarantined": report.quarantined,
        "gate_passed": gate.success,
        "kept": curated.kept,
        "seconds": {
            "ingest": round(t1 - t0, 2),
            "validate": round(t2 - t1, 2),
            "curate": round(t3 - t2, 2),
            "total": round(total, 2),
        },
        "per_s": {
            "ingest": round(n / (t1 - t0)),
            "validate": round(report.accepted / (t2 - t1)),
            "curate": round(report.accepted / (t3 - t2)),
            "pipeline": round(n / total),
            "reference_json_loads": round(n_ref / reference_s),
        },
        "cpu_s": {"main": round(main_cpu, 2), "workers": round(kids_cpu, 2)},
        "cpu_us_per_trajectory": round((main_cpu + kids_cpu) / n * 1e6),
        "free_2core_estimate_per_s": round(n / free_2core_s),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "tracetune-bench"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child, args.workers)))
        return
    results = {}
    for n in args.sizes:
        logs = make_logs(n, args.cache, max(1, args.workers))
        cmd = [sys.executable, __file__, "--child", str(logs), "--workers", str(args.workers)]
        env = os.environ | {"GX_ANALYTICS_ENABLED": "False"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[n] = json.loads(out.strip().splitlines()[-1])
        print(f"{n}: {json.dumps(results[n])}", flush=True)
    print(
        f"\n{'lines':>8} {'ingest/s':>9} {'gate/s':>8} {'curate/s':>9} {'pipeline/s':>11} "
        f"{'ref json/s':>11} {'ratio':>6} {'CPU us/traj':>12} {'2 free cores/s':>15} "
        f"{'RSS main':>9} {'RSS wrk':>8} {'load':>5}"
    )
    for n, r in results.items():
        s = r["per_s"]
        print(
            f"{n:>8} {s['ingest']:>9} {s['validate']:>8} {s['curate']:>9} {s['pipeline']:>11} "
            f"{s['reference_json_loads']:>11} {s['reference_json_loads'] / s['pipeline']:>6.1f} "
            f"{r['cpu_us_per_trajectory']:>12} {r['free_2core_estimate_per_s']:>15} "
            f"{r['peak_rss_mb']['main']:>8}M {r['peak_rss_mb']['workers']:>7}M "
            f"{r['load_average_1m']:>5}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
