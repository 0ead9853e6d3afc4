"""A hand-written batched decode loop over `past_key_values`: the rollout engine's generator.

Why not `model.generate`: on CPU with the tiny default model a decode step costs well under a
millisecond of arithmetic, so per-step bookkeeping and memory traffic decide the speed.
`generate` re-validates its config, runs logits processors and stopping criteria, and its
`DynamicCache` copies the whole cache at every step (`torch.cat`); bench/bench_rollout.py
measures both. The loop below also does what `generate` cannot do for agent rollouts:

- **shared prefix, stored once**: every episode's prompt starts with the same system prompt and
  tool schemas (~1k tokens, most of the prompt). It is encoded once per call, and its keys and
  values are kept *once*, not once per row: a small attention function
  (`shared_prefix_attention`) attends to it for all rows with one matmul, then to each row's own
  suffix, and merges the two in one softmax. A decode step then reads the prefix cache once
  instead of 32 times (the step was memory-bound: 59 ms -> see docs/benchmarks.md);
- **buffered cache**: each row's own keys/values are appended into pre-allocated buffers
  (`growing_cache`) instead of being re-concatenated at every step;
- **per-row seeded sampling**: each row draws from its own generator, so an episode samples the
  same tokens whether it runs alone or in a batch of 32 (reproducible RLVR rollouts);
- log-probabilities of the chosen tokens on request (GRPO needs them).

Rows are left-padded *after* the shared prefix (`[prefix][pads][suffix]`); the attention mask
hides the pads and position ids count real tokens only, so a row's logits do not depend on what
else is in the batch (up to float rounding), and greedy batched decoding equals one-at-a-time
decoding. Models with sliding-window layers, or a call without a shared prefix, use the model's
own attention over a per-row cache (same results, less speed). Works for decoder-only models
whose attention goes through transformers' `AttentionInterface` (all current ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SHARED_PREFIX_ATTENTION = "tracetune_shared_prefix"
SCORE_BUDGET = 1 << 24  # attention scores held at once (floats); longer prompts go in row chunks
# Per-layer (keys, values) of the shared prefix, batch 1, while a decode runs.
_PREFIX_KV: ContextVar[list[tuple[Any, Any]] | None] = ContextVar("_PREFIX_KV", default=None)


@dataclass(frozen=True)
class DecodeOutput:
    """One row's generation: token ids (the stop token included when one was produced)."""

    token_ids: list[int]
    stopped: bool
    logprobs: list[float] | None = None


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows)
    for other in rows[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


# ---------------------------------------------------------------------------------------------
# Cache and attention
# ---------------------------------------------------------------------------------------------
def growing_cache(reserve: int) -> Any:
    """A `DynamicCache` whose layers append into pre-allocated buffers instead of `torch.cat`.

    `DynamicCache` concatenates the whole cache at every step: with 32 rows of 1k tokens that
    copy (not the arithmetic) dominated a decode step on CPU (59 ms against 16 ms with buffers,
    tiny model). Buffers get `reserve` spare positions (the new tokens): a turn allocates once.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _BufferedLayer(DynamicLayer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._kbuf: Any = None
            self._vbuf: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old = self.get_seq_length()
            new = old + key_states.shape[-2]
            buf = self._kbuf
            stale = (
                buf is None
                or old == 0
                or buf.data_ptr() != self.keys.data_ptr()  # replaced by select/repeat
                or buf.shape[0] != key_states.shape[0]
                or buf.shape[2] < new
            )
            if stale:
                shape = list(key_states.shape)
                shape[2] = new + reserve
                kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
                if old:
                    kbuf[:, :, :old] = self.keys
                    vbuf[:, :, :old] = self.values
                self._kbuf, self._vbuf = kbuf, vbuf
            self._kbuf[:, :, old:new] = key_states
            self._vbuf[:, :, old:new] = value_states
            self.keys, self.values = self._kbuf[:, :, :new], self._vbuf[:, :, :new]
            return self.keys, self.values

    cache = DynamicCache()
    cache.layer_class_to_replicate = _BufferedLayer
    return cache


def shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over [shared prefix (batch 1)] + [each row's own keys], one softmax.

    `key`/`value` hold only the rows' own tokens (the cache never sees the prefix); the mask
    covers those columns. The prefix comes before every query, so it is visible to all.
    All rows' queries score the prefix in one matmul (rows in chunks when the scores would pass
    `SCORE_BUDGET`, e.g. a batch of long new prompts).
    """
    import torch

    prefix = _PREFIX_KV.get()
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    pk, pv = prefix[module.layer_idx]
    batch, heads, q_len, _ = query.shape
    per_row = heads * q_len * (pk.shape[2] + key.shape[2])
    rows = max(1, SCORE_BUDGET // max(1, per_row))
    if rows >= batch:
        return _prefix_attention(query, key, value, attention_mask, pk, pv, scaling), None
    parts = [
        _prefix_attention(
            query[i : i + rows],
            key[i : i + rows],
            value[i : i + rows],
            None if attention_mask is None else attention_mask[i : i + rows],
            pk,
            pv,
            scaling,
        )
        for i in range(0, batch, rows)
    ]
    return torch.cat(parts, dim=0), None


def _prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pk: torch.Tensor,
    pv: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """`shared_prefix_attention` for one chunk of rows; returns [B, q, heads, dim]."""
    import torch

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # Prefix scores: queries of all rows (and heads of one kv group) as rows of one matmul.
    q_grouped = query.view(batch, kv_heads, groups, q_len, dim).permute(1, 0, 2, 3, 4)
    q_flat = q_grouped.reshape(1, kv_heads, batch * groups * q_len, dim)
    s_prefix = torch.matmul(q_flat, pk.transpose(-1, -2)) * scale  # [1, kvh, B*g*q, P]
    s_prefix = s_prefix.view(kv_heads, batch, groups, q_len, -1).permute(1, 0, 2, 3, 4)
    # Own scores, per row.
    q_rows = query.view(batch, kv_heads, groups * q_len, dim)
    s_own = torch.matmul(q_rows, key.transpose(-1, -2)) * scale  # [B, kvh, g*q, S]
    s_own = s_own.view(batch, kv_heads, groups, q_len, -1)
    s_own = _mask_scores(s_own, attention_mask, q_len, key.shape[2])
    weights = torch.softmax(torch.cat([s_prefix, s_own], dim=-1), dim=-1, dtype=torch.float32)
    weights = weights.to(query.dtype)
    p_len = pk.shape[2]
    w_prefix, w_own = weights[..., :p_len], weights[..., p_len:]
    w_prefix = w_prefix.permute(1, 0, 2, 3, 4).reshape(1, kv_heads, batch * groups * q_len, p_len)
    out_prefix = torch.matmul(w_prefix, pv).view(kv_heads, batch, groups, q_len, dim)
    out_prefix = out_prefix.permute(1, 0, 2, 3, 4)
    own_len = key.shape[2]
    out_own = torch.matmul(w_own.reshape(batch, kv_heads, groups * q_len, own_len), value)
    out = out_prefix + out_own.view(batch, kv_heads, groups, q_len, dim)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()


def _mask_scores(
    scores: torch.Tensor, mask: torch.Tensor | None, q_len: int, kv_len: int
) -> torch.Tensor:
    """Apply the (bool or additive) mask of the own columns; no mask means plain causal."""
    import torch

    if mask is None:
        if q_len == 1:
            return scores
        rows = torch.arange(q_len, device=scores.device)[:, None] + (kv_len - q_len)
        allowed = torch.arange(kv_len, device=scores.device)[None, :] <= rows
        return scores.masked_fill(~allowed, float("-inf"))
    mask = mask[:, :, None, :, :]  # [B, 1, 1, q, S] against [B, kvh, g, q, S]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def _register_attention() -> None:
    """Make `shared_prefix_attention` selectable by name (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


def supports_shared_prefix(model: PreTrainedModel) -> bool:
    """Full-attention models only: a sliding window would need the prefix masked per layer."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    return not sliding and "sliding_attention" not in layer_types


@contextmanager
def _attention_with_prefix(model: PreTrainedModel, prefix_kv: list[tuple[Any, Any]]) -> Iterator[None]:
    """Route the model's attention through `shared_prefix_attention` for the block."""
    _register_attention()
    token = _PREFIX_KV.set(prefix_kv)
    previous = model.config._attn_implementation
    model.config._attn_implementation = SHARED_PREFIX_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _PREFIX_KV.reset(token)


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------
def _left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their 0/1 mask as tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _choose(
    logits: torch.Tensor,
    greedy: bool,
    temperature: float,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """Next token per row: argmax, or a draw from each row's own generator."""
    import torch

    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1).cpu()
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1).to(logits.device)
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def _encode_prefix(model: PreTrainedModel, prefix: Sequence[int]) -> list[tuple[Any, Any]]:
    """Per-layer keys and values of the shared prefix (batch 1), with the model's own attention."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def decode_batch(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    greedy: bool = True,
    temperature: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    prefix_len: int | None = None,
    keep_logprobs: bool = False,
) -> list[DecodeOutput]:
    """Generate one continuation per prompt, all rows in one KV-cached loop.

    `prefix_len` tokens at the start of every prompt are encoded once and shared (default: the
    longest common prefix; always at least one token short of the shortest prompt).
    `generators` (one per row) make sampling reproducible per row; greedy decoding ignores them.
    """
    import torch

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError("one generator per prompt")
    shortest = min(len(p) for p in prompts)
    shared = common_prefix_len(prompts) if prefix_len is None else prefix_len
    shared = max(0, min(shared, shortest - 1))
    with torch.inference_mode():
        if shared and supports_shared_prefix(model):
            prefix_kv = _encode_prefix(model, prompts[0][:shared])
            with _attention_with_prefix(model, prefix_kv):
                return _decode(model, prompts, shared, max_new_tokens, stop_ids, pad_id,
                               greedy, temperature, generators, keep_logprobs)  # fmt: skip
        return _decode(model, prompts, 0, max_new_tokens, stop_ids, pad_id,
                       greedy, temperature, generators, keep_logprobs)  # fmt: skip


def _decode(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    skip: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    greedy: bool,
    temperature: float,
    generators: Sequence[torch.Generator] | None,
    keep_logprobs: bool,
) -> list[DecodeOutput]:
    """The loop proper. The first `skip` tokens of each prompt are already attended to through
    the shared prefix, so the cache and the mask cover only what follows them."""
    import torch

    device = next(model.parameters()).device
    batch = len(prompts)
    cache = growing_cache(reserve=max_new_tokens + 1)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    ids, mask = _left_pad([p[skip:] for p in prompts], pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) + skip
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    one = torch.ones((batch, 1), dtype=mask.dtype, device=device)
    new_tokens: list[torch.Tensor] = []
    chosen_logprobs: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = _choose(logits, greedy, temperature, generators)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if keep_logprobs:
            temp = 1.0 if greedy else max(temperature, 1e-5)
            logp = torch.log_softmax(logits.float() / temp, dim=-1)
            chosen_logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        new_tokens.append(token)
        done = done | torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, one], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return _collect(new_tokens, chosen_logprobs, stops, keep_logprobs)


def _collect(
    new_tokens: list[torch.Tensor],
    logprobs: list[torch.Tensor],
    stops: torch.Tensor,
    keep_logprobs: bool,
) -> list[DecodeOutput]:
    """Per-row token lists cut just after the first stop token."""
    import torch

    if not new_tokens:
        return []
    tokens = torch.stack(new_tokens, dim=1).cpu()
    lps = torch.stack(logprobs, dim=1).cpu() if keep_logprobs else None
    stop_set = set(stops.cpu().tolist())
    outputs = []
    for i, row in enumerate(tokens.tolist()):
        cut = next((k + 1 for k, t in enumerate(row) if t in stop_set), None)
        kept = row[:cut] if cut is not None else row
        row_lp = lps[i, : len(kept)].tolist() if lps is not None else None
        outputs.append(DecodeOutput(token_ids=kept, stopped=cut is not None, logprobs=row_lp))
    return outputs
