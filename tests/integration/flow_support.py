"""Helpers for the flow tests: a fresh copy of the working tree, scaled down to run in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# The embedded default scaled down: same stages, same code, minutes -> seconds.
TINY: dict[str, Any] = {
    "simulate.n_trajectories": 300,
    "simulate.files": 2,
    "base_model.build.vocab_size": 400,
    "base_model.build.hidden_size": 32,
    "base_model.build.layers": 1,
    "base_model.build.heads": 2,
    "base_model.build.max_positions": 1024,
    "base_model.build.seq_len": 256,
    "base_model.build.pretrain_steps": 4,
    "base_model.build.batch_size": 2,
    "base_model.build.corpus_size": 40,
    "gates.curated.min_rows": 50,
    "sft.max_steps": 3,
    "sft.batch_size": 2,
    "sft.max_examples": 24,
    "sft.logging_steps": 1,
    "evaluate.max_tasks": 8,
    "evaluate.batch_size": 8,
    "evaluate.max_new_tokens": 32,
    "evaluate.max_turns": 2,
    "orchestrate.retry_delay_s": 0,
}


def copy_worktree(dst: Path, src: Path = REPO) -> Path:
    """What `git clone` of the working tree would give: tracked and not-ignored files, with the
    uncommitted edits, and no data, models or caches (git ignores them)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (os.fsdecode(p) for p in listed)):
        source = src / rel
        if source.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def keep_stages(root: Path, names: tuple[str, ...]) -> None:
    """Cut the copy's dvc.yaml down to `names`: the pipeline as it was while it grew."""
    import yaml

    path = root / "dvc.yaml"
    config = yaml.safe_load(path.read_text())
    config["stages"] = {k: v for k, v in config["stages"].items() if k in names}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def tiny_repo(dst: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A fresh copy with the tiny params plus `overrides` (dotted keys) written to params.yaml."""
    from flows.retrain import override_params

    copy_worktree(dst)
    override_params(dst / "params.yaml", TINY | (overrides or {}))
    return dst
