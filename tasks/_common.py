"""Helpers every stage entry point shares: params loading and metrics files."""

from __future__ import annotations

import json
import sys
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
