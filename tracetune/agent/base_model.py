"""The embedded default base model: a tokenizer and a tiny Qwen2 built and pre-trained locally.

Stand-in for a hub instruct model on a machine with no hub and no GPU. It is built from the
synthetic, task-agnostic corpus of `tracetune.agent.corpus` (general chat + tool-call skills,
nothing of our environment) and saved with `save_pretrained`, so every later stage loads it
through `load_model(path)` exactly like `Qwen/Qwen2.5-0.5B-Instruct`.

Why a plain torch loop rather than TRL's SFTTrainer for pre-training: the corpus is generated in
memory and already rendered with its loss spans; a 40-line loop trains on it with no dataset
round trip, no trainer start-up (TRL's import alone is ~8 s here), length-grouped batches (see
`length_batches` for why not concatenation packing) and a step count we control exactly. The
loss spans come from our template's `{% generation %}` markers, as in SFT; unlike SFT, the rest
of the conversation is learned too, with a smaller weight (see `weighted_lm_loss`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.agent.corpus import Conversation, generate_corpus, is_drill
from tracetune.agent.template import (
    END_OF_TEXT,
    IGNORE,
    IM_END,
    IM_START,
    RESPONSE_TEMPLATE,
    TOOL_TAGS,
    load_chat_template,
    render_with_spans,
)
from tracetune.config import BaseModelBuild

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILD_INFO = "tracetune_build.json"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
# Pre-tokenizer splits (`base_model.build.pretokenizer`), digits one by one in both.
SPLIT_PATTERNS = {
    # Qwen2's split, no newline glued to a word. Qwen2Tokenizer rebuilds its pre-tokenizer from
    # this pattern on reload, so training with it keeps ids stable. It glues one space or
    # punctuation mark to the word after it: an id is ` YM` in prose and `YM` after a JSON
    # quote, two unrelated ids a tiny model must learn to map for every word it copies.
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # Letters, digits, punctuation runs and whitespace each stand alone: a value is the same ids
    # in a user's sentence, a JSON string and an answer (~18% more tokens per SFT example).
    # Measured on the embedded default: no better (docs/training.md), so not the default.
    "isolated": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"
    ),
}
TOKENIZER_SAMPLE = 4000  # rendered conversations the BPE is trained on
PROBES_PER_KIND = 30  # behavioural probes run after pre-training (metrics only)


@dataclass(frozen=True)
class PretrainStats:
    steps: int
    tokens_seen: int
    supervised_tokens: int
    final_loss: float
    first_loss: float
    seconds: float
    tokens_per_second: float


@dataclass(frozen=True)
class BuildReport:
    """What `build_base_model` did; also written to `tracetune_build.json` in the model dir."""

    path: str
    config_hash: str
    params: int
    vocab_size: int
    corpus_conversations: int
    corpus_tokens: int
    pretrain: PretrainStats
    probes: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------------------------
def config_hash(build: BaseModelBuild) -> str:
    """Hash of everything that shapes the model: build params, template and corpus code."""
    from tracetune.agent import corpus

    h = hashlib.sha256()
    h.update(json.dumps(build.model_dump(mode="json"), sort_keys=True).encode())
    h.update(load_chat_template().encode())
    h.update(Path(corpus.__file__).read_bytes())
    return h.hexdigest()[:16]


def is_built(path: Path, build: BaseModelBuild) -> bool:
    """A model built by us with this exact config already sits at `path`."""
    info = read_build_info(path)
    return info is not None and info.get("config_hash") == config_hash(build)


def read_build_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(path) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _bpe_text(text: str) -> str:
    """Tag and special tokens become added tokens, so the BPE should not spend merges on them."""
    for tag in (*TOOL_TAGS, *SPECIAL_TOKENS):
        text = text.replace(tag, "\n")
    return text


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, pretokenizer: str = "qwen2"
) -> PreTrainedTokenizerBase:
    """Byte-level BPE (a split of `SPLIT_PATTERNS`) with the chat and tool tags as tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(SPLIT_PATTERNS[pretokenizer]), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TAGS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_bpe_text(t) for t in texts), trainer=trainer)
    # Not special (like Qwen2.5): they survive `skip_special_tokens=True`, the parser needs them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        model_max_length=32768,
        padding_side="left",
    )
    fast.chat_template = load_chat_template()
    fast.response_template = RESPONSE_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def new_model(tokenizer: PreTrainedTokenizerBase, build: BaseModelBuild) -> PreTrainedModel:
    """A randomly initialised Qwen2ForCausalLM sized by `build`, ids taken from the tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    vocab = tokenizer.get_vocab()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=build.hidden_size,
        intermediate_size=4 * build.hidden_size,
        num_hidden_layers=build.layers,
        num_attention_heads=build.heads,
        num_key_value_heads=build.heads,
        max_position_embeddings=build.max_positions,
        tie_word_embeddings=True,
        bos_token_id=vocab[END_OF_TEXT],
        eos_token_id=vocab[IM_END],
        pad_token_id=vocab[END_OF_TEXT],
    )
    torch.manual_seed(build.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[END_OF_TEXT],
        eos_token_id=[vocab[IM_END], vocab[END_OF_TEXT]],
        pad_token_id=vocab[END_OF_TEXT],
        do_sample=False,
    )
    return model


# ---------------------------------------------------------------------------------------------
# Data: render, tokenize with loss labels, pack
# ---------------------------------------------------------------------------------------------
def render_corpus(corpus: Sequence[Conversation]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each conversation's text and the character spans of assistant output."""
    return [render_with_spans(c["messages"], c["tools"]) for c in corpus]


def encode_with_labels(
    tokenizer: PreTrainedTokenizerBase, rendered: Sequence[tuple[str, list[tuple[int, int]]]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels: a token is learned iff it starts inside an assistant span."""
    import numpy as np

    texts = [text for text, _ in rendered]
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    out = []
    rows = zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)
    for ids, offsets, (_, spans) in rows:
        token_ids = np.asarray(ids, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        learned = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            learned |= (starts >= a) & (starts < b)
        out.append((token_ids.tolist(), np.where(learned, token_ids, IGNORE).tolist()))
    return out


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of examples of similar length, in random order (one epoch).

    Why not concatenation packing: rows that mix conversations need a block-diagonal mask
    (restarted position ids), which measured 11.5k tokens/s against 14.0k for plain causal
    attention on this CPU; dropping the mask instead would let a conversation copy ids from its
    neighbour, the very skill being taught. Grouping by length wastes almost nothing on padding
    (pads go on the right, where causal attention never looks back at them), and each example
    stays exactly what SFT and inference will see.
    """
    noisy = sorted(range(len(lengths)), key=lambda i: lengths[i] * (1 + 0.1 * rng.random()))
    batches = [noisy[i : i + batch_size] for i in range(0, len(noisy), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels, and a mask of real (non-pad) tokens."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = [ids + [pad_id] * (width - len(ids)) for ids, _ in examples]
    labels = [lab + [IGNORE] * (width - len(lab)) for _, lab in examples]
    real = [[1] * len(i) + [0] * (width - len(i)) for i, _ in examples]
    return (
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(real, dtype=torch.bool),
    )


def weighted_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    prompt_weight: float,
) -> torch.Tensor:
    """Next-token loss: assistant tokens weigh 1, every other real token `prompt_weight`.

    Why not assistant-only, as SFT: predicting a tool result that echoes the id just called, or
    an id repeated later in a conversation, is copying too; weighting the whole conversation
    gives the copy circuit several times more examples per forward pass than the assistant turns
    alone (measured: assistant-only, 1,200 steps learned the format but copied nothing).
    """
    import torch

    target = input_ids[:, 1:]
    weight = torch.where(labels[:, 1:] != IGNORE, 1.0, prompt_weight) * real[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    return (loss * weight.reshape(-1)).sum() / weight.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Pre-training
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def update(model: PreTrainedModel, optimizer: Any, loss: Any) -> float:
    """One pre-training update from `loss` (gradients clipped at norm 1); the loss's value.

    One function so that bench/bench_base_build.py times the very update `pretrain` makes.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.item())


def pretrain(
    model: PreTrainedModel,
    examples: Sequence[tuple[list[int], list[int]]],
    build: BaseModelBuild,
    pad_id: int,
    progress: bool = True,
    warmup: Sequence[tuple[list[int], list[int]]] = (),
) -> PretrainStats:
    """fp32 AdamW, weighted LM loss, length-grouped batches.

    First `build.copy_warmup * build.pretrain_steps` steps on the `warmup` examples only (short
    copy drills, batches twice as large), then `build.pretrain_steps` steps over all examples.
    Why: the copy circuit forms only after ~1,000 steps of dense copying (see `corpus.ep_echo`);
    spread thinly through full conversations it had not formed after 2,000 steps.
    """
    import torch
    from tqdm.auto import tqdm

    examples = [(ids[: build.seq_len], lab[: build.seq_len]) for ids, lab in examples]
    warm_steps = round(build.copy_warmup * build.pretrain_steps)
    warm = list(warmup) if warm_steps else []
    phases = [(warm, warm_steps, 2 * build.batch_size)] if warm else []
    phases.append((examples, build.pretrain_steps, build.batch_size))
    total = sum(steps for _, steps, _ in phases)
    rng = random.Random(build.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=build.lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    model.train()
    losses: list[float] = []
    tokens = supervised = 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc="pre-training", disable=not progress)
    for pool, steps, size in phases:  # each phase has its own lr warm-up and decay
        lengths = [len(ids) for ids, _ in pool]
        batches: list[list[int]] = []
        for step in range(steps):
            if not batches:
                batches = length_batches(lengths, size, rng)
            input_ids, labels, real = collate([pool[i] for i in batches.pop()], pad_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, build.lr)
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss = weighted_lm_loss(logits, input_ids, labels, real, build.prompt_loss_weight)
            losses.append(update(model, optimizer, loss))
            tokens += input_ids.numel()
            supervised += int((labels != IGNORE).sum())
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    return PretrainStats(
        steps=total,
        tokens_seen=tokens,
        supervised_tokens=supervised,
        final_loss=round(sum(tail) / len(tail), 4),
        first_loss=round(losses[0], 4),
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
    )


# ---------------------------------------------------------------------------------------------
# Behavioural probes: does the model copy values it has never seen into tool calls?
# ---------------------------------------------------------------------------------------------
# Entity nouns the corpus never uses, so probe tools have names and argument names never seen.
PROBE_NOUNS = ("turbine", "glacier", "violin", "lantern", "satellite", "orchard", "quarry",
               "beacon", "canoe", "kiosk", "tractor", "harp")  # fmt: skip
PROBE_KINDS = ("user_to_call", "result_to_call", "result_to_answer")


@dataclass(frozen=True)
class Probe:
    """A prompt cut from a held-out conversation and what the next assistant turn must hold."""

    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    name: str | None = None
    arguments: dict[str, Any] | None = None
    text: str | None = None


def _rename_nouns(conv: Conversation, rng: random.Random) -> Conversation:
    """Swap every entity noun of the conversation for an unseen one (tools, args, text)."""
    from tracetune.agent.corpus import ENTITY_NOUNS

    raw = json.dumps(conv)
    fresh = iter(rng.sample(PROBE_NOUNS, len(PROBE_NOUNS)))
    for noun in sorted(ENTITY_NOUNS, key=len, reverse=True):
        pattern = rf"(?<![A-Za-z]){noun}(?=s?(?![a-z]))"
        if re.search(pattern, raw):
            raw = re.sub(pattern, next(fresh, "gadget"), raw)
    out: Conversation = json.loads(raw)
    return out


def make_probes(n: int, seed: int) -> list[Probe]:
    """`n` probes of each kind from conversations the corpus seed never produces."""
    from tracetune.agent.corpus import generate_conversation

    rng = random.Random(f"probe-{seed}")
    probes: list[Probe] = []
    for kind in PROBE_KINDS:
        episode = "chain" if kind == "result_to_call" else "lookup"
        for _ in range(n):
            conv = _rename_nouns(generate_conversation(rng, [episode]), rng)
            msgs, tools = conv["messages"], conv["tools"]
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            target = turns[1] if kind != "user_to_call" else turns[0]
            message = msgs[target]
            if kind == "result_to_answer":
                probes.append(Probe(kind, msgs[:target], tools, text=_answer_value(msgs, target)))
            else:
                fn = message["tool_calls"][0]["function"]
                args = json.loads(fn["arguments"])
                probes.append(Probe(kind, msgs[:target], tools, fn["name"], args))
    return probes


def _answer_value(messages: list[dict[str, Any]], target: int) -> str:
    """The last word-ish token of the reference answer: the value copied from the result."""
    answer = str(messages[target]["content"]).rstrip(".")
    return answer.split()[-1]


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    max_new_tokens: int = 72,
    batch_size: int = 8,
) -> list[str]:
    """Greedy next assistant turns for (messages, tools) prompts, batched with left padding."""
    import torch

    from tracetune.agent.model import stop_token_ids
    from tracetune.agent.template import render_messages

    tokenizer.padding_side = "left"
    texts = [render_messages(tokenizer, m, t, add_generation_prompt=True) for m, t in prompts]
    replies: list[str] = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return replies


def probe_scores(probe: Probe, reply: str) -> dict[str, bool]:
    """What one reply got right.

    - `copied`: the call's first argument value (an id never seen in training) appears exactly
      as an argument value of the model's first call; or, for answers, the value from the tool
      result appears in the final answer;
    - `digits`: for calls, every digit of that value, in order, is among the digits of the
      first call's argument values. The default base copies an unseen id digit by digit and
      redraws its letters (`YM37920` -> `WC37920`, docs/training.md): this is the skill SFT
      then sharpens into exact copies, and what a cheaper pre-training loses first;
    - `exact`: the first call has the right tool name and exactly the right arguments. For
      unseen tools this also needs the tool name and argument names copied from the schema,
      which the base model does less well than values (SFT teaches the environment's names).
    """
    from tracetune.agent.parsing import parse_assistant_output

    turn = parse_assistant_output(reply)
    if turn.error is not None:
        return {"copied": False, "digits": False, "exact": False}
    if probe.text is not None:
        ok = turn.is_final and probe.text in (turn.content or "")
        return {"copied": ok, "digits": ok, "exact": ok}
    if not turn.tool_calls or not probe.arguments:
        return {"copied": False, "digits": False, "exact": False}
    args = json.loads(turn.tool_calls[0].arguments)
    wanted = next(iter(probe.arguments.values()))
    return {
        "copied": wanted in args.values(),
        "digits": _digits_copied(str(wanted), args),
        "exact": turn.tool_calls[0].name == probe.name and args == probe.arguments,
    }


def _digits_copied(wanted: str, args: dict[str, Any]) -> bool:
    """Is the wanted value's digit string inside the digit string of some argument value?"""
    digits = "".join(ch for ch in wanted if ch.isdigit())
    if not digits:
        return wanted in args.values()
    return any(digits in "".join(ch for ch in str(v) if ch.isdigit()) for v in args.values())


def run_probes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int = 30, seed: int = 0
) -> dict[str, float]:
    """Rates per probe kind: `<kind>_copied` and, for calls, `<kind>_digits` and `<kind>_exact`
    (`probe_scores`)."""
    probes = make_probes(n, seed)
    replies = generate_replies(model, tokenizer, [(p.messages, p.tools) for p in probes])
    rates: dict[str, float] = {}
    for kind in PROBE_KINDS:
        scores = [
            probe_scores(p, r) for p, r in zip(probes, replies, strict=True) if p.kind == kind
        ]
        measures = ("copied", "digits", "exact") if kind != "result_to_answer" else ("copied",)
        for measure in measures:
            hits = sum(s[measure] for s in scores)
            rates[f"{kind}_{measure}"] = round(hits / max(1, len(scores)), 3)
    return rates


# ---------------------------------------------------------------------------------------------
# The whole build
# ---------------------------------------------------------------------------------------------
def build_base_model(
    build: BaseModelBuild,
    out_dir: Path | str,
    progress: bool = True,
    probes_per_kind: int | None = None,
) -> BuildReport:
    """Corpus -> tokenizer -> tiny Qwen2 -> pre-training -> `save_pretrained(out_dir)`.

    Written to a sibling temp dir and moved into place at the end, so an interrupted build never
    leaves a half model that a cache check would accept.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".building")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    corpus = generate_corpus(build.corpus_size, build.seed)
    rendered = render_corpus(corpus)
    sample = random.Random(build.seed).sample(rendered, min(TOKENIZER_SAMPLE, len(rendered)))
    train_tokenizer([t for t, _ in sample], build.vocab_size, build.pretokenizer).save_pretrained(
        work
    )
    tokenizer = AutoTokenizer.from_pretrained(work)  # the class every later stage will get

    examples = encode_with_labels(tokenizer, rendered)
    drills = [ex for ex, conv in zip(examples, corpus, strict=True) if is_drill(conv)]
    model = new_model(tokenizer, build)
    stats = pretrain(
        model, examples, build, int(tokenizer.pad_token_id), progress=progress, warmup=drills
    )

    n_probes = PROBES_PER_KIND if probes_per_kind is None else probes_per_kind
    probes = run_probes(model, tokenizer, n=n_probes, seed=build.seed)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    report = BuildReport(
        path=str(out_dir),
        config_hash=config_hash(build),
        params=param_count(model),
        vocab_size=len(tokenizer),
        corpus_conversations=len(corpus),
        corpus_tokens=sum(len(ids) for ids, _ in examples),
        pretrain=stats,
        probes=probes,
    )
    info = {**report.as_dict(), "build": build.model_dump(mode="json")}
    (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    from tracetune.outputs import publish

    publish(work, out_dir)  # one step where the system allows (tracetune.outputs)
    return report


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
