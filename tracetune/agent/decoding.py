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
- **packed prefill**: a turn's new prompt tokens of all rows are encoded as one sequence
  without padding (`_packed_prefill`); each row attends to the prefix, its reused keys/values
  and its own new tokens in its own SDPA call, so short rows never pay for the longest one;
- **decode steps skip padding**: the batch holds rows longest first, and a step's attention
  runs per group of similar-length rows over only the cache columns the group needs
  (`_row_groups`); the step's mask is a slice of one additive buffer, not re-built per step;
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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SHARED_PREFIX_ATTENTION = "tracetune_shared_prefix"
# (row, the row's tokens generated so far) -> ids its next token may be, or None (any).
Constraint = Callable[[int, Sequence[int]], "set[int] | None"]
# Per-layer (keys, values) of the shared prefix, batch 1, while a decode runs.
_PREFIX_KV: ContextVar[list[tuple[Any, Any]] | None] = ContextVar("_PREFIX_KV", default=None)


@dataclass
class _Packed:
    """A packed prefill: every row's new tokens in one sequence (batch 1, no padding).

    `bounds` are each row's [start, end) in it; `history` each row's reused keys/values per
    layer (`[1, kv_heads, n, dim]`), or None; the attention fills `new_kv` (per layer: the
    packed keys/values) for the decode cache.
    """

    bounds: list[tuple[int, int]]
    history: list[list[tuple[Any, Any]] | None]
    new_kv: dict[int, tuple[Any, Any]]


_PACKED: ContextVar[_Packed | None] = ContextVar("_PACKED", default=None)
# Decode steps: the batch's rows sorted by own length, cut into groups (first row, end row,
# leading cache columns the group skips: padding for all its rows). See `_row_groups`.
_GROUPS: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("_GROUPS", default=None)


@dataclass(frozen=True)
class DecodeOutput:
    """One row's generation: token ids (the stop token included when one was produced)."""

    token_ids: list[int]
    stopped: bool
    logprobs: list[float] | None = None
    cache: RowCache | None = None  # with keep_cache: this row's keys/values for its next turn
    constrained: int = 0  # tokens drawn under a `constrain` mask
    overridden: int = 0  # of those, tokens where the mask ruled out the model's first choice


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

    class _BufferedLayer(DynamicLayer):
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
                or self.keys is None
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
    A decode step (one query per row) scores the prefix for all rows in one matmul, reading it
    once; a turn's new prompt tokens (many queries) use SDPA over the broadcast prefix.
    """

    prefix = _PREFIX_KV.get()
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    pk, pv = prefix[module.layer_idx]
    packed = _PACKED.get()
    if packed is not None:
        return _packed_attention(module.layer_idx, query, key, value, pk, pv, scaling, packed), None
    if query.shape[2] > 1:  # new prompt tokens go through `_packed_prefill`, never here
        raise RuntimeError("shared-prefix attention over new prompt tokens needs packed prefill")
    groups = _GROUPS.get()
    if groups is None:
        return _prefix_attention(query, key, value, attention_mask, pk, pv, scaling), None
    import torch

    outs = [
        _prefix_attention(
            query[a:b],
            key[a:b, :, skip:],
            value[a:b, :, skip:],
            None if attention_mask is None else attention_mask[a:b, ..., skip:],
            pk,
            pv,
            scaling,
        )
        for a, b, skip in groups
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)), None


def _packed_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    scaling: float | None,
    packed: _Packed,
) -> torch.Tensor:
    """A packed prefill (batch 1): each row's queries attend to [prefix][its reused keys][its
    new keys, causally], one SDPA call per row over exactly its own tokens. A row computes the
    same thing alone or among others (no padding, no other row's tokens in its call)."""
    import torch
    import torch.nn.functional as F

    packed.new_kv[layer] = (key, value)
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    outs = []
    for row, (start, end) in enumerate(packed.bounds):
        keys, values = [pk], [pv]
        history = packed.history[row]
        if history is not None:
            keys.append(history[layer][0])
            values.append(history[layer][1])
        keys.append(key[:, :, start:end])
        values.append(value[:, :, start:end])
        k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        n, total = end - start, k.shape[2]
        allowed = torch.arange(total, device=query.device)[None, :] <= (
            torch.arange(n, device=query.device)[:, None] + (total - n)
        )
        q = query[:, :, start:end]
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def _prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pk: torch.Tensor,
    pv: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One query per row (a decode step): all rows score the prefix in one matmul, read once."""
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
def _attention_with_prefix(
    model: PreTrainedModel, prefix_kv: list[tuple[Any, Any]]
) -> Iterator[None]:
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


class PrefixCache:
    """The shared prefix's keys/values, kept across calls while the weights stay the same.

    Why: without it every call re-encodes the ~1k-token system turn, once per round in a batch
    but once per turn for an episode decoded alone (most of a short turn's cost). Weights are
    identified by each parameter's storage and in-place version counter, which optimizer steps,
    `load_state_dict` and `copy_` all bump, so a GRPO step invalidates the entry without anyone
    calling `clear()`. One entry: a policy has one system turn.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._kv: list[tuple[Any, Any]] | None = None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def weights_key(model: PreTrainedModel, prefix: tuple[int, ...]) -> tuple[Any, ...]:
        params = tuple((p.data_ptr(), p._version) for p in model.parameters())
        return (id(model), prefix, params)

    def encode(self, model: PreTrainedModel, prefix: tuple[int, ...]) -> list[tuple[Any, Any]]:
        key = self.weights_key(model, prefix)
        if self._kv is not None and key == self._key:
            self.hits += 1
            return self._kv
        self.misses += 1
        self._kv, self._key = _encode_prefix(model, prefix), key
        return self._kv

    def clear(self) -> None:
        self._key, self._kv = None, None


def _encode_prefix(model: PreTrainedModel, prefix: Sequence[int]) -> list[tuple[Any, Any]]:
    """Per-layer keys and values of the shared prefix (batch 1), with the model's own attention."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


@dataclass(frozen=True)
class RowCache:
    """One row's own keys/values after a decode (the shared prefix excluded), for reuse.

    `ids` are the tokens they cover: the prompt after the prefix, then the generated tokens
    that were fed back (all but the last). `prefix` is the shared prefix they were computed
    after; reuse is only valid behind the same prefix.
    """

    prefix: tuple[int, ...]
    ids: list[int]
    kv: list[tuple[Any, Any]]  # per layer: keys, values of shape [kv_heads, len(ids), dim]

    def usable_for(self, prefix: Sequence[int], own: Sequence[int]) -> int:
        """How many leading tokens of `own` (a prompt after `prefix`) this cache covers.

        Keys and values at a position depend only on the tokens up to it, so any common prefix
        of the cached ids and the new prompt is exact; one token is always left to compute (the
        next token's logits come from it).
        """
        if tuple(prefix) != self.prefix:
            return 0
        return min(common_prefix_len([self.ids, own]), len(own) - 1)


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    stop_ids: Sequence[int]
    pad_id: int
    greedy: bool
    temperature: float
    generators: Sequence[torch.Generator] | None
    keep_logprobs: bool
    keep_cache: bool
    threads: _Threads
    constrain: Constraint | None = None


WIDE_TOKENS = 8  # a forward over at least this many tokens (rows x new tokens) may use more threads


class _Threads:
    """torch's thread count per forward: `wide` threads for a forward over `WIDE_TOKENS` or more
    tokens, the caller's setting for smaller ones. A one-row decode step of a tiny model is
    sub-millisecond ops that threads only slow down; a 32-row step or a prefill is work they
    split (measured on 2 cores, docs/benchmarks.md "Rollouts")."""

    def __init__(self, wide: int | None) -> None:
        import torch

        self._torch = torch
        self.narrow = torch.get_num_threads()
        self.wide = wide if wide is not None and wide > self.narrow else None
        self.current = self.narrow

    def for_tokens(self, n: int) -> None:
        want = self.wide if self.wide is not None and n >= WIDE_TOKENS else self.narrow
        if want != self.current:
            self._torch.set_num_threads(want)
            self.current = want

    def restore(self) -> None:
        self.for_tokens(0)

    def __enter__(self) -> _Threads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


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
    caches: Sequence[RowCache | None] | None = None,
    keep_cache: bool = False,
    prefix_cache: PrefixCache | None = None,
    wide_threads: int | None = None,
    constrain: Constraint | None = None,
) -> list[DecodeOutput]:
    """Generate one continuation per prompt, all rows in one KV-cached loop.

    `prefix_len` tokens at the start of every prompt are encoded once and shared (default: the
    longest common prefix; always at least one token short of the shortest prompt).
    `generators` (one per row) make sampling reproducible per row; greedy decoding ignores them.
    `caches` (one per row, from an earlier call's `keep_cache=True`) spare re-encoding what a
    row's prompt shares with its previous turn: multi-turn episodes then encode only the new
    tool results. Caches are used with the shared prefix only (full-attention models).
    `prefix_cache` keeps the shared prefix's keys/values between calls (same weights only).
    `wide_threads`: torch threads for the forwards over many tokens (`_Threads`); the caller's
    setting applies to the others. None: the caller's setting throughout.
    `constrain(row, generated)` may restrict a row's next token to a set of ids (grounded tool
    arguments, `tracetune.agent.grounding`); the token is drawn, and its log-probability
    taken, from the model's distribution renormalised over that set.
    """
    import torch

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    for name, per_row in (("generators", generators), ("caches", caches)):
        if per_row is not None and len(per_row) != len(prompts):
            raise ValueError(f"one entry of {name} per prompt")
    shortest = min(len(p) for p in prompts)
    shared = common_prefix_len(prompts) if prefix_len is None else prefix_len
    shared = max(0, min(shared, shortest - 1))
    threads = _Threads(wide_threads)
    settings = _Settings(max_new_tokens, stop_ids, pad_id, greedy, temperature, generators,
                         keep_logprobs, keep_cache, threads, constrain)  # fmt: skip
    with torch.inference_mode(), threads:
        if shared and supports_shared_prefix(model):
            prefix = tuple(prompts[0][:shared])
            reuse = _reusable(prefix, prompts, caches)
            cache = prefix_cache or PrefixCache()
            kv = cache.encode(model, prefix)
            with _attention_with_prefix(model, kv):
                return _decode(model, prompts, prefix, reuse, settings)
        return _decode(model, prompts, (), [None] * len(prompts), settings)


def _reusable(
    prefix: tuple[int, ...],
    prompts: Sequence[Sequence[int]],
    caches: Sequence[RowCache | None] | None,
) -> list[tuple[RowCache, int] | None]:
    """Per row: a cache and how many of its tokens to reuse, or None."""
    out: list[tuple[RowCache, int] | None] = []
    for i, prompt in enumerate(prompts):
        cache = caches[i] if caches is not None else None
        n = cache.usable_for(prefix, prompt[len(prefix) :]) if cache is not None else 0
        out.append((cache, n) if cache is not None and n > 0 else None)
    return out


_NO_MASK_SHAPE = (1, 1, 1, 1)  # a 4D mask is passed through as-is; the packed attention ignores it


def _packed_prefill(
    model: PreTrainedModel,
    new_rows: Sequence[Sequence[int]],
    reuse: Sequence[tuple[RowCache, int] | None],
    skip: int,
    reserve: int,
    device: Any,
    threads: _Threads,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Encode every row's new prompt tokens in one forward without padding (`_Packed`).

    The rows' tokens are concatenated into one sequence (batch 1): the linear layers see only
    real tokens, and each row attends to the shared prefix, its reused keys/values and its own
    new tokens (`_packed_attention`), so a short row never pays for the longest one. Returns the
    decode cache (each row's reused + new keys/values, left-padded, `reserve` spare positions),
    its 0/1 mask, the next-token logits of every row, the rows' next positions, the original
    index of each batch row (longest first) and each batch row's own length.
    """
    import torch

    reused = [r[1] if r is not None else 0 for r in reuse]
    bounds: list[tuple[int, int]] = []
    flat: list[int] = []
    positions: list[int] = []
    for row, n in zip(new_rows, reused, strict=True):
        bounds.append((len(flat), len(flat) + len(row)))
        flat.extend(row)
        positions.extend(range(skip + n, skip + n + len(row)))
    history: list[list[tuple[Any, Any]] | None] = [
        None if r is None else [(k[None, :, : r[1]], v[None, :, : r[1]]) for k, v in r[0].kv]
        for r in reuse
    ]
    packed = _Packed(bounds, history, {})
    last = torch.tensor([end - 1 for _, end in bounds], dtype=torch.long, device=device)
    token = _PACKED.set(packed)
    threads.for_tokens(len(flat))
    try:
        out = model(
            input_ids=torch.tensor([flat], dtype=torch.long, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            attention_mask=torch.zeros(_NO_MASK_SHAPE, dtype=torch.bool, device=device),
            use_cache=False,
            logits_to_keep=last,
        )
    finally:
        _PACKED.reset(token)
    widths = [n + end - start for n, (start, end) in zip(reused, bounds, strict=True)]
    width, batch = max(widths), len(bounds)
    # The decode batch holds the rows longest first, so that rows of similar length are
    # neighbours and a decode step can skip the padding of a group of short rows.
    order = sorted(range(batch), key=lambda i: -widths[i])
    logits = out.logits[0][order]  # [rows, vocab]: each row's last position
    cache = growing_cache(reserve=reserve)
    for layer in range(len(packed.new_kv)):
        keys, values = packed.new_kv[layer]
        shape = (batch, keys.shape[1], width + reserve, keys.shape[3])
        kbuf, vbuf = keys.new_empty(shape), values.new_empty(shape)  # spare: written first
        for k, i in enumerate(order):
            (start, end), n = bounds[i], reused[i]
            own = end - start
            if widths[i] < width:  # padding: masked, but must be finite (0 x NaN is NaN)
                kbuf[k, :, : width - widths[i]] = 0
                vbuf[k, :, : width - widths[i]] = 0
            kbuf[k, :, width - own : width] = keys[0, :, start:end]
            vbuf[k, :, width - own : width] = values[0, :, start:end]
            past = history[i]
            if past is not None:
                kbuf[k, :, width - own - n : width - own] = past[layer][0][0]
                vbuf[k, :, width - own - n : width - own] = past[layer][1][0]
        _adopt_layer(cache, kbuf, vbuf, width)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for k, i in enumerate(order):
        mask[k, width - widths[i] :] = 1
    next_pos = torch.tensor([[skip + widths[i]] for i in order], dtype=torch.long, device=device)
    return cache, mask, logits, next_pos, order, [widths[i] for i in order]


GROUP_COST = 1024  # a group's fixed cost per decode step, in cache cells (row x column) read


def _row_groups(widths: Sequence[int], width: int) -> list[tuple[int, int, int]]:
    """Cut rows sorted longest first into groups that each attend only to the cache columns
    their longest row needs: the fewest padded cells read, plus `GROUP_COST` per group (each
    group is a few more small ops per layer). Returns (first row, end row, columns skipped)."""
    n = len(widths)
    best = [0] + [2**62] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + GROUP_COST + (end - start) * widths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        start = cut[end]
        groups.append((start, end, width - widths[start]))
        end = start
    return groups[::-1]


def _adopt_layer(cache: Any, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
    """Append a layer to a `growing_cache` whose buffers are `kbuf`/`vbuf` (first `length` used)."""
    layer = cache.layer_class_to_replicate()
    layer.lazy_initialization(kbuf, vbuf)
    layer._kbuf, layer._vbuf = kbuf, vbuf
    layer.keys, layer.values = kbuf[:, :, :length], vbuf[:, :, :length]
    cache.layers.append(layer)


def _decode(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    prefix: tuple[int, ...],
    reuse: Sequence[tuple[RowCache, int] | None],
    s: _Settings,
) -> list[DecodeOutput]:
    """The loop proper. The shared prefix is attended to through `shared_prefix_attention`, so
    the cache and the mask cover only each row's own tokens: its reused ones, then the rest of
    its prompt, then what it generates. Rows that finished leave the batch once they are half
    of it (`PRUNE_AT`): the steps left cost what the rows still running need."""
    import torch

    device = next(model.parameters()).device
    skip = len(prefix)
    reused = [r[1] if r is not None else 0 for r in reuse]
    new_rows = [p[skip + n :] for p, n in zip(prompts, reused, strict=True)]
    if prefix:
        groups = None
        cache, mask, logits, next_pos, order, widths = _packed_prefill(
            model, new_rows, reuse, skip, s.max_new_tokens + 1, device, s.threads
        )
        # Decode steps get a ready 4D additive mask (0 / -inf): a slice of one buffer per call,
        # not a mask re-built (and re-concatenated) by the model at every step.
        width = mask.shape[1]
        steps = torch.zeros((len(prompts), 1, 1, width + s.max_new_tokens + 1),
                            dtype=cache.layers[0].keys.dtype, device=device)  # fmt: skip
        steps[:, 0, 0, :width].masked_fill_(mask == 0, float("-inf"))
        loop = _Loop(prompts, prefix, s, mask, device, step_mask=steps, order=order)
        loop.widths = widths
        row_groups = _row_groups(widths, width)
        groups = _GROUPS.set(row_groups)
    else:
        groups, row_groups = None, []
        # No shared prefix, so nothing is reused (caches go with the prefix only): plain
        # left-padded rows in a fresh buffered cache.
        ids, mask = _left_pad(new_rows, s.pad_id, device)
        cache = growing_cache(reserve=ids.shape[1] + s.max_new_tokens + 1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        s.threads.for_tokens(int(mask.sum()))
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        loop = _Loop(prompts, prefix, s, mask, device)
        logits = out.logits[:, -1, :]
        next_pos = positions[:, -1:] + 1
    step = 0
    try:
        for step in range(s.max_new_tokens):
            token = loop.choose(logits)
            if step == s.max_new_tokens - 1 or loop.all_done():
                break
            if loop.should_prune():
                keep = loop.prune(cache, fed=step)
                cache.batch_select_indices(keep)
                token, next_pos = token[keep], next_pos[keep]
                if prefix:
                    row_groups[:] = _row_groups(loop.widths, loop.prompt_width)
            if prefix:
                attention = loop.mask[..., : loop.prompt_width + step + 1]
            else:
                loop.mask = torch.cat([loop.mask, torch.ones_like(next_pos)], dim=1)
                attention = loop.mask
            s.threads.for_tokens(token.shape[0])
            out = model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    finally:
        if groups is not None:
            _GROUPS.reset(groups)
    return loop.finish(cache, fed=step)  # the last chosen token is never fed back


def only(row_logits: torch.Tensor, allowed: set[int]) -> torch.Tensor:
    """One row's logits with every id outside `allowed` at -inf (ids past the row ignored)."""
    import torch

    ids = sorted(i for i in allowed if i < row_logits.shape[0])
    keep = torch.tensor(ids, dtype=torch.long, device=row_logits.device)
    masked = torch.full_like(row_logits, float("-inf"))
    masked[keep] = row_logits[keep]
    return masked


PRUNE_AT = 0.5  # drop finished rows once they are this share of the rows still in the batch
PRUNE_MIN_ROWS = 2  # a batch of one has nothing to drop


class _Loop:
    """Book-keeping of one decode: which original rows are still in the batch, their tokens,
    log-probs, and (with `keep_cache`) each row's keys/values cut out when it leaves."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        prefix: tuple[int, ...],
        s: _Settings,
        mask: torch.Tensor,
        device: Any,
        step_mask: torch.Tensor | None = None,
        order: Sequence[int] | None = None,
    ) -> None:
        import torch

        self.prompts, self.prefix, self.s = prompts, prefix, s
        self.mask = mask if step_mask is None else step_mask  # what the decode steps are given
        self.prompt_width = mask.shape[1]
        self.prompt_mask = mask.bool()
        # Original index of each current row (the batch may hold them in another order).
        self.rows = list(order) if order is not None else list(range(len(prompts)))
        self.widths: list[int] = []  # own prompt length of each current row (when known)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] = [[] for _ in prompts]
        self.stopped = [False] * len(prompts)
        self.constrained = [0] * len(prompts)
        self.overridden = [0] * len(prompts)
        self.caches: list[RowCache | None] = [None] * len(prompts)
        self.stop_set = set(s.stop_ids)
        self.generators = [s.generators[r] for r in self.rows] if s.generators is not None else None
        self.device = device
        self._torch = torch

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick each current row's next token and record it (finished rows get padding)."""
        torch = self._torch
        s = self.s
        if s.constrain is not None:
            logits = self._constrained(logits, s.constrain)
        token = _choose(logits, s.greedy, s.temperature, self.generators)
        finished = torch.tensor([self.stopped[r] for r in self.rows], device=token.device)
        token = torch.where(finished, torch.full_like(token, s.pad_id), token)
        picked = token.tolist()
        if s.keep_logprobs:
            temp = 1.0 if s.greedy else max(s.temperature, 1e-5)
            logp = torch.log_softmax(logits.float() / temp, dim=-1)
            chosen = logp.gather(1, token[:, None]).squeeze(1).tolist()
        for k, row in enumerate(self.rows):
            if self.stopped[row]:
                continue
            self.tokens[row].append(picked[k])
            if s.keep_logprobs:
                self.logprobs[row].append(chosen[k])
            self.stopped[row] = picked[k] in self.stop_set
        return token

    def _constrained(self, logits: torch.Tensor, constrain: Constraint) -> torch.Tensor:
        """The logits with every token a row's constraint rules out at -inf (a copy)."""
        out = logits
        for k, row in enumerate(self.rows):
            if self.stopped[row]:
                continue
            allowed = constrain(row, self.tokens[row])
            if not allowed:
                continue
            if out is logits:
                out = logits.clone()
            self.constrained[row] += 1
            self.overridden[row] += int(out[k].argmax()) not in allowed
            out[k] = only(out[k], allowed)
        return out

    def all_done(self) -> bool:
        return all(self.stopped[r] for r in self.rows)

    def should_prune(self) -> bool:
        done = sum(self.stopped[r] for r in self.rows)
        return len(self.rows) >= PRUNE_MIN_ROWS and done >= PRUNE_AT * len(self.rows)

    def prune(self, cache: Any, fed: int) -> torch.Tensor:
        """Cut out the finished rows (saving their caches); returns the indices kept."""
        keep = [k for k, r in enumerate(self.rows) if not self.stopped[r]]
        if self.s.keep_cache and self.prefix:
            for k, row in enumerate(self.rows):
                if self.stopped[row]:
                    self.caches[row] = self._row_cache(cache, k, row, fed)
        index = self._torch.tensor(keep, dtype=self._torch.long, device=self.device)
        self.rows = [self.rows[k] for k in keep]
        if self.widths:
            self.widths = [self.widths[k] for k in keep]
        self.mask = self.mask.index_select(0, index)
        self.prompt_mask = self.prompt_mask.index_select(0, index)
        if self.generators is not None:
            self.generators = [self.generators[k] for k in keep]
        return index

    def _row_cache(self, cache: Any, k: int, row: int, fed: int) -> RowCache:
        """Row `row` (current index `k`): its real prompt positions and its generated tokens but
        the last. The last (the stop token, or the one chosen at the cap) is fed back only when
        other rows go on; leaving it out always keeps what a row caches independent of the
        batch it ran in (its next turn recomputes that one token)."""
        torch = self._torch
        kept = min(len(self.tokens[row]) - 1, fed)
        real = torch.nonzero(self.prompt_mask[k]).squeeze(1)
        width = self.prompt_width
        generated = torch.arange(width, width + kept, device=real.device)
        index = torch.cat([real, generated])
        kv = [
            (layer.keys[k].index_select(1, index), layer.values[k].index_select(1, index))
            for layer in cache.layers
        ]
        ids = list(self.prompts[row][len(self.prefix) :]) + self.tokens[row][:kept]
        return RowCache(self.prefix, ids, kv)

    def finish(self, cache: Any, fed: int) -> list[DecodeOutput]:
        if self.s.keep_cache and self.prefix:
            for k, row in enumerate(self.rows):
                self.caches[row] = self._row_cache(cache, k, row, fed)
        return [
            DecodeOutput(
                token_ids=self.tokens[i],
                stopped=self.stopped[i],
                logprobs=self.logprobs[i] if self.s.keep_logprobs else None,
                cache=self.caches[i],
                constrained=self.constrained[i],
                overridden=self.overridden[i],
            )
            for i in range(len(self.prompts))
        ]
