"""Shared-prefix SFT: the system prompt and tool schemas go through the model once per batch.

Why: every example of an agent's SFT set starts with the same system turn and tool listing
(585 of ~860 tokens on the embedded default; 1-3k tokens of JSON schemas for real tool sets),
and none of it is trained on. A plain batch runs that prefix once per row. Here a batch's longest
common prefix runs once, its keys and values are repeated for every row, and only the rows'
own tokens run as a batch on top. Each row still attends to exactly the tokens it would alone,
at the same positions, so the loss and the gradients are those of the plain batch (the prefix's
gradient is the sum of every row's, through the repeated cache), for about half the compute.
"""

from __future__ import annotations

from typing import Any

from tracetune.agent.template import IGNORE

MIN_SHARED = 16  # below this, one extra forward call costs more than it saves


def shared_prefix_length(input_ids: Any, labels: Any) -> int:
    """Tokens every row shares before the first trained label of any row (0: nothing to share).

    The cut `c` must leave token `c` untrained: its prediction comes from the prefix's last
    position, which the split forward does not score.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else input_ids.shape[1]
    trained = (labels != IGNORE).any(dim=0).nonzero()
    first_trained = int(trained[0]) if len(trained) else input_ids.shape[1]
    cut = min(common, first_trained, input_ids.shape[1] - 1)
    return cut if cut >= MIN_SHARED else 0


def _backbone(model: Any) -> Any:
    """The decoder stack under DDP, PEFT and the LM head (LoRA layers are inside it)."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner.get_decoder()


def split_inputs(model: Any, inputs: dict[str, Any], cut: int) -> dict[str, Any]:
    """`inputs` for the rows' own tokens, the shared prefix run once and repeated as a cache."""
    input_ids = inputs["input_ids"]
    rows = input_ids.shape[0]
    prefix = _backbone(model)(input_ids=input_ids[:1, :cut], use_cache=True)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(rows)  # a differentiable copy per row: gradients sum back
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels", "position_ids")}
    rest["input_ids"] = input_ids[:, cut:]
    rest["labels"] = inputs["labels"][:, cut:]
    if "position_ids" in inputs:
        rest["position_ids"] = inputs["position_ids"][:, cut:]
    rest["past_key_values"] = cache  # the 2-D attention_mask still covers prefix + rest
    return rest


def prefix_sharing_trainer() -> type:
    """`SFTTrainer` whose training batches run their shared prefix once (see module doc)."""
    from trl import SFTTrainer

    class PrefixSharingSFTTrainer(SFTTrainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            cut = 0
            if model.training and "attention_mask" in inputs and "labels" in inputs:
                cut = shared_prefix_length(inputs["input_ids"], inputs["labels"])
            if cut:
                inputs = split_inputs(model, inputs, cut)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return PrefixSharingSFTTrainer
