"""Stage `base_model`: build the embedded default base model, once, unless the user names another.

`base_model.name_or_path` is a hub id, a local path or a GGUF file. When it points at
`paths.models / "base"` (the default) this stage builds the embedded model: corpus, tokenizer,
tiny Qwen2, pre-training (`tracetune.agent.base_model`), cached by a hash of its config, template
and corpus code. When it names a GGUF file (`*.gguf`, `pkg://PACKAGE/FILE.gguf`) this stage
converts it into a plain checkpoint at the same path (`tracetune.agent.gguf_source`), cached by
the file's content hash. Either way a second run is a no-op even outside DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params, is_gguf_source


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
    from tracetune.agent.gguf_source import read_gguf_info

    return (
        (path / "config.json").exists()
        and read_build_info(path) is None
        and read_gguf_info(path) is None
    )


def convert(params: Params) -> dict[str, Any]:
    """The GGUF source converted into `paths.models/base` (or found there already)."""
    from tracetune.agent.gguf_source import convert_gguf

    out = embedded_path(params)
    if _foreign(out):
        raise SystemExit(
            f"error: {out} holds a model this stage did not make; move it away or point "
            "base_model.name_or_path at it instead of a GGUF file"
        )
    info = convert_gguf(params.base_model.name_or_path, out)
    return {"path": str(out), **info}


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the embedded model; returns and writes `metrics/base_model.json`."""
    from tracetune.agent.base_model import build_base_model, is_built, read_build_info

    build = params.base_model.build
    out = embedded_path(params)
    metrics_path = params.paths.metrics / "base_model.json"
    if is_gguf_source(params.base_model.name_or_path):
        summary = convert(params)
        write_json(metrics_path, summary)
        return summary
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

    console = Console()
    params = stage_params(argv)
    out_path = embedded_path(params)
    if is_embedded(params):
        console.print(f"[bold]base model[/]: building into {out_path} if needed")
    if is_gguf_source(params.base_model.name_or_path):
        console.print(f"[bold]base model[/]: GGUF {params.base_model.name_or_path} -> {out_path}")
    from tracetune.agent.gguf_source import GGUFSourceError
    from tracetune.tracking import log_summary, stage_run

    with stage_run(params.tracking, "base_model"):  # the MLflow run spans the build
        try:
            summary = run(params)
        except GGUFSourceError as exc:
            console.print(f"[red]error[/]: {exc}")
            raise SystemExit(2) from None
        log_summary(summary, "base_model.json")
    console.print(base_model_line(summary), markup=False, soft_wrap=True)


def base_model_line(summary: dict[str, Any]) -> str:
    """One line for the console; every field stays in metrics/base_model.json."""
    from tracetune.console import num

    shown = ("path", "params", "vocab_size", "final_loss", "tokens_per_second", "seconds")
    parts = [f"{k.replace('_', ' ')} {num(summary[k])}" for k in shown if summary.get(k)]
    return f"base model ({summary.get('status')}): " + ", ".join(parts)


if __name__ == "__main__":
    main()
