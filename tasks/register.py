"""Stage `register`: put an evaluated candidate in the MLflow model registry.

`python -m tasks.register [CANDIDATE] [--params params.yaml]` reads
`metrics/eval_<CANDIDATE>.json` (default: `registry.candidate`), its model directory and
`reports/eval/<CANDIDATE>/`, judges it with the promotion gate, registers a version carrying
metrics, params, lineage (git commit, DVC hashes from dvc.lock) and the verdict, and moves
`challenger` if it passed. It writes `metrics/register.json`. The champion moves only through
`tracetune approve` or the approval flow (docs/registry.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks._common import write_json
from tracetune.config import Params, ParamsError, load_params


def run(params: Params, candidate: str | None = None, **paths: Any) -> dict[str, Any]:
    """Register one candidate; returns and writes the summary (`metrics/register.json`)."""
    from tracetune.registry.register import register_candidate

    name = candidate or params.registry.candidate
    result = register_candidate(params, name, **paths)
    summary = {k: v for k, v in result.as_dict().items() if k not in ("lineage", "reasons")} | {
        "reasons": result.reasons
    }
    write_json(params.paths.metrics / "register.json", summary)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__)
    parser.add_argument("candidate", nargs="?", help="eval_<candidate>.json to register")
    parser.add_argument("--params", "-p", default="params.yaml", help="path to params.yaml")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    from tracetune.console import quiet_libraries

    quiet_libraries()  # as every stage does in stage_params: no library progress bars
    args = parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = run(params, args.candidate, params_file=Path(args.params))
    console = Console()
    if summary.get("reused"):
        console.print(
            f"[bold]{summary['model']}[/] v{summary['version']} already holds this model and "
            "evaluation (same content): no new version"
        )
    colour = "green" if summary["verdict"] == "passed" else "red"
    console.print(
        f"[bold]{summary['model']}[/] v{summary['version']} ({summary['candidate']}): "
        f"gate [{colour}]{summary['verdict']}[/]"
        + (", alias challenger" if summary["challenger"] else "")
        + (", auto-approved as champion" if summary["auto_approved"] else "")
    )
    for reason in summary["reasons"]:
        console.print(f"  {reason}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    main()
