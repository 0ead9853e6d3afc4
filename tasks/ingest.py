"""Stage `ingest`: read what arrived since the last batch, quarantine bad lines, scrub PII."""

from __future__ import annotations

import sys
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params
from tracetune.tracking import log_summary, stage_run, tracking_uri
from tracetune.trajectories.ingest import IngestPaths, QuarantineRateExceeded, ingest
from tracetune.trajectories.pii import PiiKeyMissing, key_for
from tracetune.trajectories.readers import UnrecognisedFormat, open_log_source
from tracetune.trajectories.sources import SourceUnavailable
from tracetune.trajectories.usage import estimator_from_params

METRICS = "ingest.json"


def ingest_paths(params: Params) -> IngestPaths:
    p = params.paths
    return IngestPaths(
        batches=p.ingested,
        quarantine=p.quarantine,
        index=p.ingest_index,
        state=p.ingest_state,
        rejected=p.reports / "ingest" / "rejected_batch_quarantine.jsonl",
    )


def run(params: Params) -> dict[str, Any]:
    """Ingest one batch; raises `QuarantineRateExceeded` (nothing committed) when it is too bad,
    `SourceUnavailable` (nothing committed) when the store keeps failing, `UnrecognisedFormat`
    (nothing committed) when a log object is in no format it can read, `PiiKeyMissing`
    (nothing read) for a production source without a secret pseudonym key.

    `ingest.mlflow_experiment` is read from the project's tracking store.
    """
    usage = estimator_from_params(params.ingest.usage, params.base_model.name_or_path)
    source = open_log_source(params.ingest, tracking_uri(params.tracking))
    report = ingest(params.ingest, ingest_paths(params), source, usage=usage, key=key_for(params))
    summary = report.as_dict()
    write_json(params.paths.metrics / METRICS, summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    held = s.get("held_back_partial_lines", 0)
    pending = f"; {held} last line(s) pending until their newline arrives" if held else ""
    if s["batch"] is None:
        return f"ingest: nothing new in {s['source']} ({s['files']}){pending}"
    reasons = ", ".join(f"{k}={v}" for k, v in s["quarantine_reasons"].items()) or "none"
    return (
        f"ingest batch {s['batch']} from {s['source']}: read {s['read']} = accepted "
        f"{s['accepted']} + quarantined {s['quarantined']} (duplicates {s['duplicates']}); "
        f"quarantine rate {s['quarantine_rate']:.2%}; reasons: {reasons}; "
        f"PII replaced: {s['pii_replacements'] or 'none'} (key: {s['pii_key']}); "
        f"usage estimated for {s['usage_estimated']} ({s['usage_counted_with']}); "
        f"files {s['files']}" + pending
    )


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv)
    with stage_run(params.tracking, "ingest"):  # the MLflow run spans the ingest
        summary = _run_or_exit(params)
        log_summary(summary, METRICS)
    print(format_summary(summary))


def _run_or_exit(params: Params) -> dict[str, Any]:
    try:
        return run(params)
    except PiiKeyMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except QuarantineRateExceeded as exc:
        summary = exc.report.as_dict()
        log_summary(summary, "ingest_rejected.json")
        print(f"error: {exc}\n  reasons: {summary['quarantine_reasons']}", file=sys.stderr)
        raise SystemExit(1) from None
    except SourceUnavailable as exc:
        print(
            f"error: the log store failed: {exc}\n  nothing was committed, the watermark did "
            "not move; the next run reads these objects again",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except UnrecognisedFormat as exc:
        print(f"error: nothing was committed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
