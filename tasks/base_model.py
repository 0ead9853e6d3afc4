"""Stage `base_model`: build the embedded default base model, once, unless the user names another.

`base_model.name_or_path` is a hub id or a local path. Only when it points at
`paths.models / "base"` (the default) does this stage build anything: corpus, tokenizer, tiny
Qwen2, pre-training (`tracetune.agent.base_model`). The build is cached by a hash of its config,
template and corpus code, so a second run is a no-op even outside DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params


def embedded_path(params: Params) -> Path:
    """Where the embedded default lives: `paths.models / "base"`."""
    return params.paths.models / "base"


def is_embedded(params: Params) -> bool:
    """Whether `base_model.name_or_path` names the model this stage builds."""
    named = Path(params.base_model.name_or_path)
    return named.resolve() == embedded_path(params).resolve()


def _foreign(path: Path) -> bool:
    """A model someone put at our path by hand (no build record): never overwrite it."""
    from tracetune.agent.base_model import read_build_info

    return (path / "config.json").exists() and read_build_info(path) is None


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the embedded model; returns and writes `metrics/base_model.json`."""
    from tracetune.agent.base_model import build_base_model, is_built, read_build_info

    build = params.base_model.build
    out = embedded_path(params)
    metrics_path = params.paths.metrics / "base_model.json"
    if not is_embedded(params) or _foreign(out):
        summary = {"status": "external", "name_or_path": params.base_model.name_or_path}
        write_json(metrics_path, summary)
        return summary
    if is_built(out, build):
        info = read_build_info(out) or {}
        summary = {"status": "cached", **_metrics(info)}
    else:
        report = build_base_model(build, out, progress=progress)
        summary = {"status": "built", **_metrics(report.as_dict())}
    write_json(metrics_path, summary)
    return summary


def _metrics(info: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth tracking between builds (flat keys for `dvc metrics diff`)."""
    pre = info.get("pretrain", {})
    return {
        "path": info.get("path"),
        "config_hash": info.get("config_hash"),
        "params": info.get("params"),
        "vocab_size": info.get("vocab_size"),
        "corpus_conversations": info.get("corpus_conversations"),
        "tokens_seen": pre.get("tokens_seen"),
        "supervised_tokens": pre.get("supervised_tokens"),
        "final_loss": pre.get("final_loss"),
        "seconds": pre.get("seconds"),
        "tokens_per_second": pre.get("tokens_per_second"),
        **{f"probe_{k}": v for k, v in info.get("probes", {}).items()},
    }


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    params = stage_params(argv)
    if is_embedded(params):
        console.print(f"[bold]base model[/]: building into {embedded_path(params)} if needed")
    summary = run(params)
    table = Table(title=f"Base model ({summary['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


if __name__ == "__main__":
    main()
