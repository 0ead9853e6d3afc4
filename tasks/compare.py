"""Stage `compare`: the evaluated models beside production and the do-nothing floor.

`python -m tasks.compare MODEL... [PARAMS_FILE]` (dvc.yaml: `base sft rlvr`) reads
`metrics/eval_<model>.json` of each and writes the headline `dvc metrics show` prints:
`metrics/arms/<arm>.json` (TSR with its 95% bounds, n, steps, cost per task; one small file per
arm, tracked by git so `dvc metrics diff` compares with any commit), and the side-by-side plot
data `reports/compare/tsr_by_family.json` (TSR with 95% bounds per arm and family).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params

ARMS_DIR = "arms"
PLOT = Path("compare") / "tsr_by_family.json"


def compare_paths(params: Params) -> dict[str, Path]:
    return {
        "arms": params.paths.metrics / ARMS_DIR,
        "plot": params.paths.reports / PLOT,
    }


def run(params: Params, models: list[str]) -> dict[str, dict[str, Any]]:
    """Write the headline files and the plot data; returns arm -> headline row."""
    from tracetune.evaluation.compare import family_rows, headline, side_by_side

    payloads = {}
    for model in models:
        path = params.paths.metrics / f"eval_{model}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run `dvc repro evaluate@{model}` first")
        payloads[model] = json.loads(path.read_text())
    arms = side_by_side(payloads)
    paths = compare_paths(params)
    # The directory is the stage's output: an arm dropped from the list must not linger in it.
    shutil.rmtree(paths["arms"], ignore_errors=True)
    rows = {name: headline(block) for name, block in arms.items()}
    for name, row in rows.items():
        write_json(paths["arms"] / f"{name}.json", row)
    paths["plot"].parent.mkdir(parents=True, exist_ok=True)
    paths["plot"].write_text(json.dumps(family_rows(arms), indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    models = [a for a in args if not a.endswith((".yaml", ".yml"))]
    if not models:
        print("usage: python -m tasks.compare MODEL... [PARAMS_FILE]", file=sys.stderr)
        raise SystemExit(2)
    params = stage_params([a for a in args if a not in models])
    for name, row in run(params, models).items():
        tsr = "n/a" if row["tsr"] is None else f"{row['tsr']:.3f}"
        print(f"{name:>12}: TSR {tsr} [{row['tsr_low']:.3f}, {row['tsr_high']:.3f}] n={row['n']}")


if __name__ == "__main__":
    main()
