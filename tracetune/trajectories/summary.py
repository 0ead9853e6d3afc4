"""The data summary: what came in, what each rule removed, what is left per family, how long.

The full summary (`metrics/data_summary.json`), its headline counts (`metrics/data.json`, one
row of `dvc metrics show`) and one CSV plot of the token-length histogram (`dvc plots show`),
built from the stage reports; nothing here re-reads the data.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tracetune.trajectories.split import TOKEN_BIN, TOKEN_BINS, SplitReport


def histogram_stats(counts: list[int]) -> dict[str, Any]:
    """n, mean and percentiles (bin midpoints) of a fixed-width token histogram."""
    n = sum(counts)
    if not n:
        return {"n": 0}
    mids = [i * TOKEN_BIN + TOKEN_BIN // 2 for i in range(len(counts))]

    def pct(q: float) -> int:
        running = 0
        for mid, c in zip(mids, counts, strict=True):
            running += c
            if running >= q * n:
                return mid
        return mids[-1]

    mean = sum(m * c for m, c in zip(mids, counts, strict=True)) / n
    return {"n": n, "mean": round(mean, 1), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def data_summary(
    ingest_state: dict[str, Any], curate: dict[str, Any], split: SplitReport
) -> dict[str, Any]:
    totals = ingest_state.get("totals", {})
    families: dict[str, dict[str, int]] = {}
    for family, n in curate.get("families_in", {}).items():
        families.setdefault(family, {})["ingested"] = n
    for family, n in curate.get("families_kept", {}).items():
        families.setdefault(family, {})["curated"] = n
    for family, sides in split.families.items():
        entry = families.setdefault(family, {})
        entry["train"] = sides.get("train", 0)
        entry["heldout"] = sides.get("heldout", 0)
    return {
        "ingest": {
            "batches": ingest_state.get("batches", 0),
            **{k: totals.get(k, 0) for k in ("read", "accepted", "quarantined", "duplicates")},
            "quarantine_reasons": totals.get("quarantine_reasons", {}),
        },
        "curation": {
            "input": curate.get("input", 0),
            "kept": curate.get("kept", 0),
            "dropped_by_rule": curate.get("dropped_by_rule", {}),
        },
        "split": {k: v for k, v in split.as_dict().items() if k != "families"},
        "families": dict(sorted(families.items())),
        "approx_tokens": {
            "train": histogram_stats(split.token_hist["train"]),
            "heldout": histogram_stats(split.token_hist["heldout"]),
            "max": split.token_max,
        },
    }


def data_headline(summary: dict[str, Any]) -> dict[str, int]:
    """The data's row of `dvc metrics show`: what came in, what was kept, how it was split.

    Flat short keys, so the row adds five columns to the table, not one per quarantine reason,
    curation rule and family (those, duplicates and `accepted` stay in the full summary)."""
    return {
        "read": summary["ingest"].get("read", 0),
        "quarantined": summary["ingest"].get("quarantined", 0),
        "curated": summary["curation"].get("kept", 0),
        "train": summary["split"].get("train", 0),
        "heldout": summary["split"].get("heldout", 0),
    }


def histogram_rows(split: SplitReport) -> list[tuple[int, int, int]]:
    """(bin start, train, held-out) up to one empty bin past the longest trajectory.

    The fixed bins run to 3,072 tokens; curated data usually ends far below, and a plot of
    every bin drew it squeezed into the left seventh of the axis."""
    train, heldout = split.token_hist["train"], split.token_hist["heldout"]
    used = [i for i in range(TOKEN_BINS + 1) if train[i] or heldout[i]]
    last = min((used[-1] + 1) if used else 0, TOKEN_BINS)
    return [(i * TOKEN_BIN, train[i], heldout[i]) for i in range(last + 1)]


def write_token_histogram(path: Path, split: SplitReport) -> Path:
    """CSV for `dvc plots`: one row per 64-token bin, counts for train and held-out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["approx_tokens", "train", "heldout"])
        writer.writerows(histogram_rows(split))
    return path
