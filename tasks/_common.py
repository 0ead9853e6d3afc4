"""Helpers every stage entry point shares: params loading and metrics files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracetune.config import Params, ParamsError, load_params


def stage_params(argv: list[str] | None = None) -> Params:
    """Load params.yaml (or the path given as the only argument) or exit with the key paths.

    Also quiets library progress bars: every stage starts here, and the main job's console
    carries every stage's output (tracetune/console.py).
    """
    from tracetune.console import quiet_libraries

    quiet_libraries()
    args = sys.argv[1:] if argv is None else argv
    try:
        return load_params(args[0] if args else "params.yaml")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def run_gate_stage(
    params: Params, name: str, metrics_file: str, run: Callable[[Params], dict[str, Any]]
) -> dict[str, Any]:
    """A Great Expectations gate stage under its MLflow run (which spans the gate): the
    counts are logged either way; a failed gate prints its report and exits 1."""
    from tracetune.data.gates import GateFailed
    from tracetune.tracking import log_summary, stage_run

    with stage_run(params.tracking, name):
        try:
            metrics = run(params)
        except GateFailed as exc:
            log_summary(exc.result.metrics(), metrics_file)
            print(exc.result.summary(params.gates.failed_rows_shown), file=sys.stderr)
            raise SystemExit(1) from None
        log_summary(metrics, metrics_file)
    return metrics
