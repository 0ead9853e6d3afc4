"""Stage `validate_curated`: the Great Expectations gate on the curated train + held-out set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from tasks._common import run_gate_stage, stage_params, write_json
from tracetune.config import Params
from tracetune.data.features import CURATED_COLUMNS, curated_row
from tracetune.data.gates import GateFailed, curated_checks, run_gate, utc_now
from tracetune.environments.base import load_environment
from tracetune.trajectories.curation import exact_key
from tracetune.trajectories.pii import pii_in
from tracetune.trajectories.split import HELDOUT_FILE, TRAIN_FILE, read_heldout_tasks

METRICS = "validate_curated.json"


def curated_rows(params: Params) -> Iterator[dict[str, Any]]:
    """Every curated trajectory as a gate row; train rows are flagged when their task is held out.

    Held-out task ids come from both heldout_tasks.json and heldout.jsonl, so a split that wrote
    one but not the other cannot hide a leak.
    """
    curated = params.paths.curated_dir
    heldout_ids = {t["task_id"] for t in read_heldout_tasks(curated)["tasks"]}
    with (curated / HELDOUT_FILE).open("rb") as handle:
        heldout_ids.update(orjson.loads(line)["task_id"] for line in handle)
    frozen = frozenset(heldout_ids)
    for split, name in (("heldout", HELDOUT_FILE), ("train", TRAIN_FILE)):
        with (curated / name).open("rb") as handle:
            for n, line in enumerate(handle, 1):
                record = orjson.loads(line)
                hits = len(pii_in(record))
                yield curated_row(
                    record, split, exact_key(record), frozen, hits, n, str(curated / name)
                )


def run(params: Params) -> dict[str, Any]:
    out = params.paths.metrics / METRICS
    out.unlink(missing_ok=True)
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    families = params.gates.curated.required_families or env.families()
    docs = params.paths.reports / "gx" / "curated"
    result = run_gate(
        "curated",
        curated_checks(params.gates.curated, families, params.curate.require_success),
        CURATED_COLUMNS,
        curated_rows(params),
        docs,
        index_columns=("trajectory_id", "split", "source", "line"),
        examples=params.gates.failed_rows_shown,
        run_name=f"validate_curated-{utc_now():%Y%m%dT%H%M%SZ}",
    )
    if not result.success:
        (docs / "summary.txt").write_text(result.summary() + "\n")
        raise GateFailed(result)
    metrics = result.metrics()
    write_json(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv)
    metrics = run_gate_stage(params, "validate_curated", METRICS, run)
    print(
        f"GX gate 'curated' PASSED on {metrics['rows']} rows ({metrics['evaluated']} expectations)"
    )


if __name__ == "__main__":
    main()
