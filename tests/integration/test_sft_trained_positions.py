"""SFT's LM head scores only trained positions on CPU: same loss and gradients, less work.

TRL's own fused head (`add_fused_lm_head`) on a real tiny Qwen2 model, once as TRL runs it on
CPU (every position scored, the untrained ones zeroed) and once after
`score_only_trained_positions` (only labelled positions projected).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture()
def trl_choice() -> Iterator[Any]:
    """TRL's device switch as TRL ships it, put back after the test."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton as original

    saved = trl_utils._use_triton
    trl_utils._use_triton = original
    yield trl_utils
    trl_utils._use_triton = saved


def _loss_and_grads(model_dir: Path) -> tuple[float, list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(
        5, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1)
    )
    labels = ids.clone()
    labels[:, :25] = -100  # the prompt: untrained, as most of an agent's SFT row
    labels[1, 30:] = -100
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return float(out.loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_scoring_only_trained_positions_keeps_loss_and_gradients(
    trl_choice: Any,
    tiny_base: Path,
) -> None:
    from tracetune.training.sft import score_only_trained_positions

    assert trl_choice._use_triton(torch.device("cpu")) is False  # TRL: every position on CPU
    every_loss, every_grads = _loss_and_grads(tiny_base)
    score_only_trained_positions()
    assert trl_choice._use_triton(torch.device("cpu")) is True
    trained_loss, trained_grads = _loss_and_grads(tiny_base)
    assert trained_loss == pytest.approx(every_loss, rel=1e-6)
    assert len(trained_grads) == len(every_grads)
    for a, b in zip(trained_grads, every_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    score_only_trained_positions()  # twice: not wrapped again
    assert getattr(trl_choice._use_triton, "every_device", False)
