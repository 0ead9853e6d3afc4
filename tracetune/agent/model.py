"""Loading an agent model the way every stage does: by hub id or local path, same code path.

The embedded default (`models/base`) is saved with `save_pretrained`, so it goes through exactly
the `AutoModelForCausalLM` / `AutoTokenizer` path that `Qwen/Qwen2.5-0.5B-Instruct` would. torch
and transformers are imported inside the functions: importing tracetune stays cheap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.agent.template import END_OF_TEXT, IM_END, ensure_chat_template

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "content_hash",
    "ensure_chat_template",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "pick_device_dtype",
    "stop_token_ids",
]


def pick_device_dtype(device: str = "auto") -> tuple[str, torch.dtype]:
    """CUDA with bf16 when there is a GPU, else CPU with float32 (CPU bf16 is slow and lossy)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer ready for batched generation: left padding, a pad token, a generation template.

    Always through `AutoTokenizer`: a saved qwen2 tokenizer reloads as `Qwen2Tokenizer`, and only
    that path gives the same ids everywhere (STACK.md).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            END_OF_TEXT if END_OF_TEXT in tokenizer.get_vocab() else tokenizer.eos_token
        )
    ensure_chat_template(tokenizer)
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end an assistant turn: `<|im_end|>`, the eos token and `<|endoftext|>`."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in (IM_END, END_OF_TEXT) if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def load_model(
    name_or_path: str | Path, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on the picked device and dtype) and its tokenizer.

    The generation config is told to stop at `<|im_end|>` and to pad with the pad token, so
    `model.generate` ends each assistant turn where the chat template does.
    """
    from transformers import AutoModelForCausalLM

    device, dtype = pick_device_dtype(device)
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    gen: Any = model.generation_config
    if gen is not None:
        current = gen.eos_token_id
        eos = [current] if isinstance(current, int) else list(current or [])
        gen.eos_token_id = sorted(set(eos) | set(stop_token_ids(tokenizer)))
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def content_hash(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, or of a folder's files: each relative name, then its bytes.

    One function for every "which model is this" question (run identities, evaluation cache
    keys, lineage tags), so two stages never disagree about whether a model changed.
    """
    h = hashlib.new(algorithm)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update((file.relative_to(path).as_posix() if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """Content hash of a local model folder (a hub id stands for itself)."""
    path = Path(name_or_path)
    if not path.exists():
        return hashlib.sha256(f"hub:{name_or_path}".encode()).hexdigest()[:16]
    return content_hash(path)[:16]
