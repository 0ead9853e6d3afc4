"""Benchmark: what the ingest watermark's fingerprints cost (docs/data.md, "What the fingerprints
cost").

    .venv/bin/python bench/bench_fingerprints.py               # 128 MiB file, 20k-line ingest
    .venv/bin/python bench/bench_fingerprints.py --mib 512

Measures, with a warm page cache: the prefix re-hash of a changed local `.jsonl` (MiB/s), the
streaming hash fed line by line while reading (µs per line), one `stat` per unchanged file, the
old 4 KiB head hash for comparison, hashlib's hashes side by side, and ingest's own throughput
for scale. Everything runs on one thread (hashlib and ingest's reader); each timing is the best
of 3. The record (bench/results/bench_fingerprints.json) names each side's settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from _record import Figure, print_figures, start_record, write_record


def _line(i: int) -> bytes:
    record = {
        "trajectory_id": f"t-{i}",
        "task_id": f"customer_tier:C-{i:04d}",
        "family": "customer_tier",
        "timestamp": "2026-11-01T00:00:00+00:00",
        "model": "m",
        "messages": [
            {"role": "user", "content": f"Which tier is C-{i:04d} in? I am ana{i}@mailbox.org"},
            {"role": "assistant", "content": "Gold."},
        ],
        "success": True,
        "steps": 1,
        "error_retries": 0,
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "cost_usd": 0.001,
        "latency_s": 1.0,
    }
    return json.dumps(record).encode() + b"\n"


def _best(fn: object, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="size of the re-hashed file")
    parser.add_argument("--lines", type=int, default=20_000, help="lines in the ingest run")
    args = parser.parse_args()
    record = start_record("bench_fingerprints")
    found: dict[str, float] = {}

    from tracetune.config import IngestParams
    from tracetune.trajectories.ingest import IngestPaths, ingest
    from tracetune.trajectories.pii import PiiKey
    from tracetune.trajectories.sources import LocalSource, new_hasher

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        src = tmp / "logs"
        src.mkdir()
        block = b"".join(_line(i) for i in range(1000))
        big = src / "big.jsonl"
        with big.open("wb") as out:
            while out.tell() < args.mib << 20:
                out.write(block)
        size = big.stat().st_size
        source = LocalSource(src)
        obj = next(iter(source.objects()))
        seconds = _best(lambda: source.prefix_hasher(obj, size))
        print(
            f"prefix re-hash: {size / 2**20:.0f} MiB in {seconds:.3f} s = "
            f"{size / 2**20 / seconds:.0f} MiB/s"
        )
        found["prefix_rehash_mib_s"] = size / 2**20 / seconds

        data = os.urandom(64 << 20)
        for name in ("sha256", "sha1", "blake2b", "md5"):

            def run(name: str = name) -> None:
                hasher = hashlib.new(name)
                for i in range(0, len(data), 1 << 20):
                    hasher.update(data[i : i + (1 << 20)])

            found[f"{name}_mib_s"] = 64 / _best(run)
            print(f"  {name}: {found[f'{name}_mib_s']:.0f} MiB/s")

        lines = block.splitlines(keepends=True) * 20

        def stream() -> None:
            hasher = new_hasher()
            for raw in lines:
                hasher.update(raw)

        found["stream_us_per_line"] = _best(stream) / len(lines) * 1e6
        print(f"streaming hash: {found['stream_us_per_line']:.2f} µs per line")
        n = 10_000
        start = time.perf_counter()
        for _ in range(n):
            big.stat()
        found["stat_us"] = (time.perf_counter() - start) / n * 1e6
        print(f"stat: {found['stat_us']:.1f} µs per unchanged file")
        start = time.perf_counter()
        for _ in range(n):
            with big.open("rb") as handle:
                hashlib.sha1(handle.read(4096)).hexdigest()
        found["head_hash_us"] = (time.perf_counter() - start) / n * 1e6
        print(f"old 4 KiB head hash: {found['head_hash_us']:.1f} µs per file")
        big.unlink()

        log = src / "a.jsonl"
        log.write_bytes(b"".join(_line(i) for i in range(args.lines)))
        paths = IngestPaths(
            tmp / "b", tmp / "q", tmp / "i.sqlite", tmp / "s.json", tmp / "rejected.jsonl"
        )
        start = time.perf_counter()
        key = PiiKey(b"bench-fingerprints-key", "bench")  # a throwaway source needs a key
        report = ingest(IngestParams(source=str(src)), paths, key=key)
        seconds = time.perf_counter() - start
        mib = log.stat().st_size / 2**20
        print(
            f"ingest: {report.read} lines, {mib:.1f} MiB in {seconds:.2f} s = "
            f"{mib / seconds:.1f} MiB/s, {report.read / seconds:.0f} lines/s, "
            f"{seconds / report.read * 1e6:.0f} µs per line"
        )
        found["ingest_us_per_line"] = seconds / report.read * 1e6
        found["ingest_lines"] = report.read
    figs = figures(found, args.mib)
    print("\nsettings: one thread (hashlib, ingest's reader), warm page cache, best of 3")
    print_figures(figs)
    details = {
        "budget": f"{args.mib} MiB re-hashed file, {args.lines}-line ingest",
        "measured": {k: round(v, 3) for k, v in found.items()},
    }
    print(f"record: {write_record(record, figs, details)}")


def figures(found: dict[str, float], mib: int) -> list[Figure]:
    """The watermark's costs against what they replace or are bounded by."""
    one = "one thread, warm page cache, best of 3"
    share = 100 * found["stream_us_per_line"] / found["ingest_us_per_line"]
    return [
        Figure(
            name="fingerprint prefix re-hash of a changed .jsonl",
            value=round(found["prefix_rehash_mib_s"]),
            unit="MiB/s",
            ours=f"LocalSource.prefix_hasher (SHA-256) over a {mib} MiB file; {one}",
            reference=f"hashlib sha256 over 64 MiB in memory, 1 MiB updates; {one}",
            reference_value=round(found["sha256_mib_s"]),
            ratio=round(found["prefix_rehash_mib_s"] / found["sha256_mib_s"], 2),
            note="the reference is the hash alone (no file reading): the ceiling",
        ),
        Figure(
            name="fingerprint streaming hash per line, against ingest's own cost per line",
            value=round(found["stream_us_per_line"], 2),
            unit="µs/line",
            ours=f"SHA-256 fed line by line; {one}",
            reference=f"ingest of {int(found['ingest_lines'])} lines, whole pipeline; {one}",
            reference_value=round(found["ingest_us_per_line"], 1),
            note=f"the hash is {share:.2f}% of ingest's time per line",
        ),
        Figure(
            name="unchanged file check: one stat vs the old 4 KiB head hash",
            value=round(found["stat_us"], 1),
            unit="µs/file",
            ours=f"one os.stat per unchanged file; {one}",
            reference=f"the old check: open + read 4 KiB + sha1; {one}",
            reference_value=round(found["head_hash_us"], 1),
            ratio=round(found["stat_us"] / found["head_hash_us"], 2),
        ),
    ]


if __name__ == "__main__":
    main()
