"""Stage `validate_raw`: the Great Expectations gate on the newest ingested batch."""

from __future__ import annotations

from typing import Any

from tasks._common import run_gate_stage, stage_params, write_json
from tracetune.config import Params
from tracetune.data.features import RAW_COLUMNS, raw_rows, with_origins
from tracetune.data.gates import GateFailed, raw_checks, run_gate, utc_now
from tracetune.environments.base import load_environment
from tracetune.trajectories.ingest import last_batch_file, read_origins
from tracetune.trajectories.tool_errors import build_rule

METRICS = "validate_raw.json"
# What the metrics' `status` says when there was no batch to check: not a pass (`success` is
# null), not a failure either (an incremental run may have nothing new); the flow shows it.
NOTHING_TO_VALIDATE = "nothing_to_validate"


def run(params: Params) -> dict[str, Any]:
    """Validate the last batch; raises `GateFailed` (Data Docs written) when the gate fails."""
    out = params.paths.metrics / METRICS
    out.unlink(missing_ok=True)  # a stale pass must not outlive a failing run
    batch = last_batch_file(params.paths.ingest_state, params.paths.ingested)
    if batch is None or not batch.exists() or batch.stat().st_size == 0:
        metrics = {
            "gate": "raw",
            "status": NOTHING_TO_VALIDATE,
            "success": None,  # not a pass: nothing was checked
            "note": "no ingested trajectories to check (no batch yet, or it is empty)",
        }
        write_json(out, metrics)
        return metrics
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    known = frozenset(env.tool_names())
    rule = build_rule(params.tool_errors, env)
    index = params.paths.ingest_index
    with batch.open("rb") as handle:
        rows = raw_rows(handle, known, params.gates.workers, rule, batch.name)
        result = run_gate(
            "raw",
            raw_checks(params.gates.raw, known, utc_now()),
            RAW_COLUMNS,
            with_origins(rows, lambda ids: read_origins(index, ids)),
            params.paths.reports / "gx" / "raw",
            examples=params.gates.failed_rows_shown,
            run_name=f"validate_raw-{batch.stem}",
        )
    if not result.success:
        (params.paths.reports / "gx" / "raw" / "summary.txt").write_text(result.summary() + "\n")
        raise GateFailed(result)
    metrics = result.metrics() | {"status": "passed", "batch": batch.name}
    write_json(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv)
    metrics = run_gate_stage(params, "validate_raw", METRICS, run)
    if metrics["status"] == NOTHING_TO_VALIDATE:
        print(f"GX gate 'raw': NOTHING TO VALIDATE, {metrics['note']}")
        return
    print(
        f"GX gate 'raw' PASSED on {metrics['rows']} rows "
        f"({metrics['evaluated']} expectations, batch {metrics['batch']})"
    )


if __name__ == "__main__":
    main()
