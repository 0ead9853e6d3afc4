"""A real tiny agent model for the rollout and evaluation tests (nothing mocked).

Built through the base-model API (`tracetune.agent.base_model`): our synthetic corpus, a
byte-level BPE trained on it, a random Qwen2 and a few pre-training steps, saved with
`save_pretrained` and loaded back through `load_model` like any hub model. One build per test
session (a few seconds), shared through pytest's base temp dir.

Then its layer weights are re-drawn wider (std 0.3): a freshly initialised tiny model with tied
embeddings only repeats its last token ("\n\n\n..."), whatever the context, which would make
the batching and cache tests blind; with wider weights its tokens depend on the whole context,
and its turns end at different lengths (some at `<|im_end|>`), as a real model's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracetune.config import BaseModelBuild

TINY_BUILD = BaseModelBuild(
    vocab_size=400,
    hidden_size=32,
    layers=2,
    heads=4,
    max_positions=4096,
    seq_len=384,
    pretrain_steps=2,
    batch_size=4,
    lr=3e-3,
    corpus_size=40,
    seed=0,
)


def build_tiny_agent_model(out: Path, build: BaseModelBuild = TINY_BUILD) -> Path:
    """Tokenizer + tiny Qwen2 + a few pre-training steps, saved at `out`."""
    from transformers import AutoTokenizer

    from tracetune.agent.base_model import (
        encode_with_labels,
        new_model,
        pretrain,
        render_corpus,
        train_tokenizer,
    )
    from tracetune.agent.corpus import generate_corpus
    from tracetune.agent.rollout import torch_threads

    rendered = render_corpus(generate_corpus(build.corpus_size, build.seed))
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(
        [text for text, _ in rendered], build.vocab_size, build.pretokenizer
    ).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = new_model(tokenizer, build)
    examples = encode_with_labels(tokenizer, rendered)
    with torch_threads(1):  # tiny ops: threads only add stalls on a shared CPU
        pretrain(model, examples, build, tokenizer.pad_token_id, progress=False)
    scramble(model, std=0.3, seed=build.seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def scramble(model: Any, std: float, seed: int) -> None:
    """Re-draw the decoder layers' weight matrices (see the module docstring for why)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.normal_(0.0, std, generator=generator)


def tiny_model_dir(factory: pytest.TempPathFactory) -> Path:
    """The session's tiny model, built on first use."""
    path = factory.getbasetemp() / "tiny_agent_model"
    if not (path / "config.json").exists():
        build_tiny_agent_model(path)
    return path
