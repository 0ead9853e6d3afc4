"""Lineage of a model version: which code, data and model bytes it came from.

DVC already hashed every stage output when it ran the pipeline (`dvc.lock`), so we read the md5
of the curated data and of the model directory from there instead of hashing gigabytes again:
the same hash then finds the bytes in the DVC cache or remote (`dvc get`/`dvc pull`). Outside a
DVC run (no lock file, or the path is not a tracked output) the hash is simply absent and the
lineage says so; it never blocks a registration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DvcOut:
    """One tracked output of a DVC stage, as `dvc.lock` records it."""

    stage: str
    path: str
    md5: str
    size: int | None = None
    nfiles: int | None = None


@dataclass(frozen=True)
class Lineage:
    """Everything a model version points back to."""

    git_commit: str | None
    data: list[DvcOut] = field(default_factory=list)
    model: list[DvcOut] = field(default_factory=list)
    eval_md5: str | None = None
    params_md5: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """Flat tags for the model version: `tracetune.dvc.<path>` = md5, plus the commit."""
        out = {"tracetune.git_commit": self.git_commit or "unknown"}
        for item in (*self.data, *self.model):
            out[f"tracetune.dvc.{item.path}"] = item.md5
        if self.eval_md5:
            out["tracetune.eval_md5"] = self.eval_md5
        if self.params_md5:
            out["tracetune.params_md5"] = self.params_md5
        return out


def _stage_entries(lock: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(stage name, entry) pairs; `foreach` stages may nest their items one level deeper."""
    pairs: list[tuple[str, dict[str, Any]]] = []
    for name, entry in (lock.get("stages") or {}).items():
        if not isinstance(entry, dict):
            continue
        if "cmd" in entry or "outs" in entry:
            pairs.append((str(name), entry))
        else:
            pairs += [(f"{name}@{k}", v) for k, v in entry.items() if isinstance(v, dict)]
    return pairs


def read_dvc_outs(lock_path: Path) -> list[DvcOut]:
    """Every output recorded in `dvc.lock` (empty when the file does not exist)."""
    import yaml

    if not lock_path.exists():
        return []
    lock = yaml.safe_load(lock_path.read_text()) or {}
    outs: list[DvcOut] = []
    for stage, entry in _stage_entries(lock):
        for out in entry.get("outs") or []:
            md5 = out.get("md5") or out.get("etag") or out.get("checksum")
            if isinstance(out, dict) and out.get("path") and md5:
                outs.append(DvcOut(stage, str(out["path"]), str(md5), out.get("size"),
                                   out.get("nfiles")))  # fmt: skip
    return outs


def _relative(path: Path, root: Path) -> Path:
    """`path` relative to the DVC root when inside it (dvc.lock paths are relative)."""
    resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
    try:
        return resolved.relative_to(root.resolve())
    except ValueError:
        return resolved


def outs_for(outs: list[DvcOut], target: Path, root: Path) -> list[DvcOut]:
    """The outputs that hold `target`: the out itself, an ancestor directory, or files in it.

    The curated data are several file outs under one folder; a model may be saved into a
    sub-folder (`models/sft/merged`) of a tracked directory (`models/sft`).
    """
    rel = _relative(target, root)
    found = []
    for out in outs:
        out_path = Path(out.path)
        if out_path == rel or out_path in rel.parents or rel in out_path.parents:
            found.append(out)
    return sorted(found, key=lambda o: o.path)


def file_md5(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_lineage(
    *,
    dvc_lock: Path,
    data_dir: Path,
    model_dir: Path,
    git_commit: str | None,
    eval_file: Path | None = None,
    params_file: Path | None = None,
) -> Lineage:
    """The lineage of a candidate from `dvc.lock`, the git commit and file hashes."""
    root = dvc_lock.parent
    outs = read_dvc_outs(dvc_lock)
    return Lineage(
        git_commit=git_commit,
        data=outs_for(outs, data_dir, root),
        model=outs_for(outs, model_dir, root),
        eval_md5=file_md5(eval_file) if eval_file else None,
        params_md5=file_md5(params_file) if params_file else None,
    )


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested params as `a.b.c` keys with string values (MLflow params are strings)."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:6000]}
