"""Stage `split`: train / held-out by task id, heldout_tasks.json, and the data summary."""

from __future__ import annotations

import json
from typing import Any

from tasks._common import stage_params, write_json
from tasks.curate import METRICS as CURATE_METRICS
from tasks.curate import curated_path
from tracetune.config import Params
from tracetune.environments.base import declared_splits, load_environment
from tracetune.tracking import log_summary, stage_run
from tracetune.trajectories.ingest import read_state
from tracetune.trajectories.io import iter_lines
from tracetune.trajectories.split import declared_test_tasks, logged_tasks, split_curated
from tracetune.trajectories.summary import data_headline, data_summary, write_token_histogram

SUMMARY = "data_summary.json"
HEADLINE = "data.json"  # the data's row of `dvc metrics show` (tracked by git)
TOKEN_PLOT = "token_lengths.csv"


def run(params: Params) -> dict[str, Any]:
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    unknown = set(params.split.heldout_families) - set(env.families())
    if unknown:
        raise ValueError(f"split.heldout_families: unknown families {sorted(unknown)}")
    # The evaluation set: held-out tasks of every logged episode (any outcome) and the
    # environment's declared test split.
    report = split_curated(
        iter_lines(curated_path(params)),
        params.paths.curated_dir,
        params.split,
        declared_splits(env),
        logged_tasks(params.paths.ingested),
        declared_test_tasks(env),
    )
    curate_metrics = json.loads((params.paths.metrics / CURATE_METRICS).read_text())
    summary = data_summary(read_state(params.paths.ingest_state), curate_metrics, report)
    write_json(params.paths.metrics / SUMMARY, summary)
    write_json(params.paths.metrics / HEADLINE, data_headline(summary))
    write_token_histogram(params.paths.metrics / TOKEN_PLOT, report)
    return summary


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv)
    with stage_run(params.tracking, "split"):
        summary = run(params)
        log_summary(summary, SUMMARY)
    s = summary["split"]
    print(f"split: train {s['train']}, held-out {s['heldout']} ({s['heldout_tasks']} tasks)")


if __name__ == "__main__":
    main()
