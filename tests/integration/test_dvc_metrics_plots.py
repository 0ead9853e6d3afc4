"""`dvc metrics show`, `dvc metrics diff` and `dvc plots show` on a real DVC + git copy of the
working tree (its dvc.yaml, .gitignore and .dvc/config), with the compare stage run for real
from evaluation files shaped like the evaluate stage's.

What a user walk-through found: one metrics table 13,732 characters wide, `dvc metrics diff`
unable to compare with HEAD (metrics/ was git-ignored), and plots drawn by scripts from a CDN,
blank offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from compare_support import arm, three_models
from flow_support import copy_worktree

from tracetune.config import SplitParams
from tracetune.trajectories.split import split_curated
from tracetune.trajectories.summary import write_token_histogram

HEADLINES = [f"metrics/arms/{a}.json" for a in ("base", "floor", "production", "rlvr", "sft")]
# A terminal a little wider than 80 columns holds the whole table.
MAX_TABLE_WIDTH = 140


def run(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo),  # the stages import the copy's code
    }
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args).stdout


def write_evaluations(repo: Path, models: dict[str, dict[str, Any]]) -> None:
    for model, payload in models.items():
        path = repo / "metrics" / f"eval_{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))


def write_data_files(repo: Path) -> None:
    """What the split stage writes for `dvc metrics show` / `dvc plots show`."""
    lines = [
        json.dumps(
            {
                "trajectory_id": f"t{i}",
                "task_id": f"order_status:{i}",
                "family": "order_status",
                "messages": [{"role": "user", "content": "x" * (40 * i)}],
            }
        )
        for i in range(1, 40)
    ]
    report = split_curated(lines, repo / "data" / "curated", SplitParams(heldout_fraction=0.3))
    write_token_histogram(repo / "metrics" / "token_lengths.csv", report)
    counts = {"read": 40, "quarantined": 1, "curated": 39}
    split = {"train": report.train, "heldout": report.heldout}
    (repo / "metrics" / "data.json").write_text(json.dumps(counts | split))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The copy after `dvc repro` of the compare stage, everything committed."""
    root = copy_worktree(tmp_path_factory.mktemp("dvc") / "repo")
    write_evaluations(root, three_models())
    write_data_files(root)
    dvc(root, "repro", "--single-item", "compare")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run 1")
    return root


def test_git_versions_the_headline_files_and_dvc_the_detailed_ones(repo: Path) -> None:
    tracked = run(repo, "git", "ls-files", "metrics").stdout.split()
    assert sorted(tracked) == sorted([*HEADLINES, "metrics/data.json"])
    ignored = run(repo, "git", "check-ignore", "metrics/eval_sft.json", "dvc_plots/index.html")
    assert ignored.stdout.split() == ["metrics/eval_sft.json", "dvc_plots/index.html"]
    assert json.loads(dvc(repo, "status", "compare", "--json")) == {}  # nothing to do


def test_metrics_show_prints_one_narrow_row_per_arm(repo: Path) -> None:
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]  # the workspace's files
    assert sorted(files) == sorted([*HEADLINES, "metrics/data.json"])  # no detailed file
    table = dvc(repo, "metrics", "show")
    width = max(len(line) for line in table.splitlines())
    assert width <= MAX_TABLE_WIDTH, table
    header, *lines = [line.split() for line in table.splitlines() if line.strip()]
    rows = {cells[0]: dict(zip(header[1:], cells[1:], strict=True)) for cells in lines}
    assert rows["metrics/arms/rlvr.json"]["tsr"] == "0.8"
    assert rows["metrics/arms/production.json"]["steps"] == "4.0"
    assert rows["metrics/data.json"]["quarantined"] == "1"
    # The rest stays a command away, e.g. the full evaluation of one model.
    full = dvc(repo, "metrics", "show", "--json", "metrics/eval_sft.json")
    assert "baseline_production" in full


def test_metrics_diff_compares_the_workspace_with_head(repo: Path) -> None:
    models = three_models()
    models["sft"]["candidate"] = arm({"order_status": (5, 5), "refund": (4, 5)})
    write_evaluations(repo, models)
    dvc(repo, "repro", "--single-item", "compare")
    diff = json.loads(dvc(repo, "metrics", "diff", "--json"))
    assert diff["metrics/arms/sft.json"]["tsr"] == {"old": 0.5, "new": 0.9, "diff": 0.4}
    assert set(diff) == {"metrics/arms/sft.json"}  # the other arms did not move


def test_plots_show_needs_no_network_and_draws_every_split_and_arm(repo: Path) -> None:
    # From a subdirectory: the page (.dvc/config) and the plot template (.dvc/plots) are found
    # from anywhere in the repository, and the page DVC writes there is git-ignored.
    dvc(repo / "docs", "plots", "show")
    page = (repo / "docs" / "dvc_plots" / "index.html").read_text()
    assert run(repo, "git", "check-ignore", "docs/dvc_plots/index.html").stdout.strip()
    srcs = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", page, flags=re.I)
    assert srcs == [], srcs
    assert not re.search(r"<link[^>]+href\s*=\s*[\"']?https?:", page, flags=re.I)
    assert "vega-embed 6." in page and "vegaEmbed(" in page
    specs = _specs(page)
    tokens = next(s for s in specs if "Curated trajectory length" in json.dumps(s.get("title")))
    fields = {row["field"] for row in tokens["data"]["values"]}
    assert fields == {"train", "heldout"}  # both splits, not train alone
    longest = max(int(row["approx_tokens"]) for row in tokens["data"]["values"])
    assert longest < 640  # the axis ends near the data (390 tokens at most here)
    side = next(s for s in specs if "Held-out TSR per family" in json.dumps(s.get("title")))
    arms = {row["arm"] for row in side["data"]["values"]}
    assert arms == {"base", "sft", "rlvr", "production", "floor"}


def _specs(page: str) -> list[dict[str, Any]]:
    """The Vega-Lite specs DVC embedded in the page body: `var spec = {...};`."""
    decoder = json.JSONDecoder()
    specs = []
    body = page.index("<body>\n")  # the inlined scripts hold "<body>" in a string
    for match in re.finditer(r"var spec = ", page[body:]):
        spec, _ = decoder.raw_decode(page, body + match.end())
        specs.append(spec)
    return specs
