"""Stage `curate`: golden filter + exact/near dedupe over every ingested batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params
from tracetune.environments.base import load_environment
from tracetune.tracking import log_summary, stage_run
from tracetune.trajectories.curation import curate
from tracetune.trajectories.io import atomic_writer, iter_lines
from tracetune.trajectories.tool_errors import build_rule

METRICS = "curate.json"
CURATED_FILE = "curated.jsonl"


def curated_path(params: Params) -> Path:
    return params.paths.curated_dir / CURATED_FILE


def run(params: Params) -> dict[str, Any]:
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    rule = build_rule(params.tool_errors, env)
    with atomic_writer(curated_path(params)) as out:
        report = curate(
            iter_lines(params.paths.ingested),
            params.curate,
            out,
            params.curate.workers,
            rule=rule,
        )
    summary = report.as_dict()
    write_json(params.paths.metrics / METRICS, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv)
    with stage_run(params.tracking, "curate"):
        s = run(params)
        log_summary(s, METRICS)
    rules = ", ".join(f"{k}={v}" for k, v in s["dropped_by_rule"].items())
    print(f"curate: {s['input']} in, {s['kept']} kept, {s['dropped']} dropped ({rules})")


if __name__ == "__main__":
    main()
