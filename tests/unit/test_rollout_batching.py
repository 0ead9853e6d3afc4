"""The rollout engine with a real tiny model: batching must not change what an episode does.

Episodes at different turns share one left-padded, KV-cached decode; the shared prefix
(system prompt + tools) is stored once. Under greedy fp32 decoding a batch of episodes must give
exactly the trajectories the same episodes give one at a time, and the hand-written decode loop
must agree with `model.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rollout_support import tiny_model_dir

from tracetune.agent.rollout import (
    EnvPool,
    ModelPolicy,
    RolloutConfig,
    TurnRequest,
    env_factory_from_params,
    run_rollouts,
)
from tracetune.config import EnvironmentParams, Pricing
from tracetune.environments.base import Task
from tracetune.environments.support_desk import SupportDesk

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> ModelPolicy:
    """The tiny model, its turns prefilled with `<tool_call>` so that episodes go multi-turn
    (a malformed call is a failed step, not an end): every later turn re-uses the earlier ones'
    keys and values, and batches mix episodes at different turns."""
    return ModelPolicy.from_pretrained(
        model_dir, name="tiny", device="cpu", max_new_tokens=20, response_prefix="<tool_call>\n"
    )


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return SupportDesk().tasks(6, seed=3)


@pytest.fixture(scope="module")
def pool() -> EnvPool:
    return EnvPool(env_factory_from_params(EnvironmentParams()))


def _comparable(results: list[Any]) -> list[dict[str, Any]]:
    return [r.trajectory.model_dump(exclude={"timestamp", "latency_s"}) for r in results]


def test_batched_and_one_at_a_time_greedy_rollouts_are_identical(
    policy: ModelPolicy, tasks: list[Task], pool: EnvPool
) -> None:
    def run(batch: int) -> list[Any]:
        config = RolloutConfig(max_new_tokens=20, max_turns=3, batch_size=batch)
        return run_rollouts(tasks, policy, pool, config, pricing=Pricing(), progress=False)

    batched, single = run(4), run(1)  # 4 < 6 tasks: slots refill, turns mix in a batch
    assert _comparable(batched) == _comparable(single)
    assert sum(len(r.turns) for r in batched) > len(tasks)  # multi-turn episodes
    for result in batched:
        usage = result.trajectory.usage
        assert usage.prompt_tokens == sum(t.prompt_tokens for t in result.turns) > 0
        assert 0 < usage.completion_tokens <= (20 + 2) * len(result.turns)  # + the prefill
        assert result.trajectory.model == "tiny"


def test_seeded_sampling_does_not_depend_on_the_batch(model_dir: Path, tasks: list[Task]) -> None:
    sampler = ModelPolicy.from_pretrained(
        model_dir, name="tiny", device="cpu", max_new_tokens=12, greedy=False, seed=7
    )
    env = SupportDesk()
    requests = [TurnRequest(i, 0, t, env.reset(t), env.tool_schemas()) for i, t in enumerate(tasks)]
    together = [o.text for o in sampler.generate(requests)]
    alone = [sampler.generate([r])[0].text for r in requests]
    assert together == alone
    assert len(set(together)) > 1  # really sampled, not one string
    sampler.seed = 8
    assert [o.text for o in sampler.generate(requests)] != together


def test_decode_loop_matches_model_generate(policy: ModelPolicy, tasks: list[Task]) -> None:
    env = SupportDesk()
    requests = [TurnRequest(i, 0, t, env.reset(t), env.tool_schemas()) for i, t in enumerate(tasks)]
    ours = policy.generate(requests)
    policy.decoder = "hf"
    try:
        theirs = policy.generate(requests)
    finally:
        policy.decoder = "loop"
    assert [o.text for o in ours] == [o.text for o in theirs]
    assert [o.completion_tokens for o in ours] == [o.completion_tokens for o in theirs]


def test_shared_prefix_attention_matches_full_attention_with_grouped_heads() -> None:
    """A random GQA model (4 query heads, 2 kv heads): prefix-shared logits equal plain ones."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tracetune.agent.decoding import decode_batch
    from tracetune.agent.rollout import torch_threads

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    prefix = torch.randint(3, 97, (40,)).tolist()
    prompts = [prefix + torch.randint(3, 97, (n,)).tolist() for n in (5, 9, 2)]
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "stop_ids": [0], "pad_id": 1}
    with torch_threads(1):
        shared = decode_batch(model, prompts, prefix_len=40, keep_logprobs=True, **kwargs)
        plain = [decode_batch(model, [p], prefix_len=0, keep_logprobs=True, **kwargs)[0]
                 for p in prompts]  # fmt: skip
    assert [s.token_ids for s in shared] == [p.token_ids for p in plain]
    for s, p in zip(shared, plain, strict=True):
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)


def test_reusing_a_turns_keys_and_values_changes_nothing(
    policy: ModelPolicy, tasks: list[Task], pool: EnvPool
) -> None:
    """Multi-turn episodes encode only their new tokens (cached per episode) or everything:
    the trajectories must be the same, and the cache must really cover the previous turn."""
    from tracetune.agent.decoding import decode_batch

    config = RolloutConfig(max_new_tokens=20, max_turns=3, batch_size=3)
    policy.reuse_cache = False
    try:
        fresh = run_rollouts(tasks, policy, pool, config, progress=False)
    finally:
        policy.reuse_cache = True
    reused = run_rollouts(tasks, policy, pool, config, progress=False)
    assert _comparable(reused) == _comparable(fresh)
    assert any(len(r.turns) > 1 for r in reused)  # there was a later turn to reuse for

    env = SupportDesk()
    request = TurnRequest(0, 0, tasks[0], env.reset(tasks[0]), env.tool_schemas())
    first = policy.encode(request)
    n = policy.shared_prefix_len([request], [first])
    assert n > 0
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "stop_ids": [], "pad_id": policy.pad_id}
    with torch_threads_1():
        [out] = decode_batch(policy.model, [first], prefix_len=n, keep_cache=True, **kwargs)
        assert out.cache is not None
        assert out.cache.ids == first[n:] + out.token_ids[:-1]  # the last token was never fed
        longer = first + out.token_ids + first[-5:]
        assert out.cache.usable_for(first[:n], longer[n:]) == len(out.cache.ids)
        [again] = decode_batch(policy.model, [longer], prefix_len=n, caches=[out.cache], **kwargs)
        [plain] = decode_batch(policy.model, [longer], prefix_len=n, **kwargs)
    assert again.token_ids == plain.token_ids


def torch_threads_1() -> Any:
    from tracetune.agent.rollout import torch_threads

    return torch_threads(1)


def test_rows_that_finish_leave_the_batch_without_changing_anything(
    policy: ModelPolicy, tasks: list[Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop tokens picked so that half the rows stop early: they are pruned mid-decode, and
    tokens, log-probs and each row's kept keys/values equal those of a row decoded alone."""
    from tracetune.agent import decoding

    env = SupportDesk()
    requests = [TurnRequest(i, 0, t, env.reset(t), env.tool_schemas()) for i, t in enumerate(tasks)]
    prompts = [policy.encode(r) for r in requests]
    n = policy.shared_prefix_len(requests, prompts)
    base: dict[str, Any] = {"max_new_tokens": 12, "pad_id": policy.pad_id, "prefix_len": n}
    with torch_threads_1():
        free = decoding.decode_batch(policy.model, prompts, stop_ids=[], **base)
    stops = sorted({out.token_ids[2 + i] for i, out in enumerate(free[:3])})
    prunes: list[int] = []
    prune = decoding._Loop.prune

    def counted(self: Any, cache: Any, fed: int) -> Any:
        prunes.append(len(self.rows))
        return prune(self, cache, fed)

    monkeypatch.setattr(decoding._Loop, "prune", counted)  # counts; the real prune runs
    kwargs = {**base, "stop_ids": stops, "keep_cache": True, "keep_logprobs": True}
    with torch_threads_1():
        batched = decoding.decode_batch(policy.model, prompts, **kwargs)
        alone = [decoding.decode_batch(policy.model, [p], **kwargs)[0] for p in prompts]
    assert prunes and prunes[0] == len(prompts)
    for b, a in zip(batched, alone, strict=True):
        assert b.token_ids == a.token_ids and b.stopped == a.stopped
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert b.cache is not None and a.cache is not None and b.cache.ids == a.cache.ids
        for (bk, bv), (ak, av) in zip(b.cache.kv, a.cache.kv, strict=True):
            assert torch.allclose(bk, ak, atol=1e-4) and torch.allclose(bv, av, atol=1e-4)
    assert sum(b.stopped for b in batched) >= 3


def test_row_groups_cover_the_batch_and_skip_only_padding() -> None:
    """Decode-step groups: contiguous, every row once, each skipping only columns that are
    padding for all of its rows (rows are sorted longest first)."""
    from tracetune.agent.decoding import GROUP_COST, _row_groups

    assert _row_groups([7], 7) == [(0, 1, 0)]
    widths = [3000, 2990, 900, 880, 40, 35, 30, 12]
    groups = _row_groups(widths, 3000)
    assert groups[0][0] == 0 and groups[-1][1] == len(widths)
    assert all(groups[k][1] == groups[k + 1][0] for k in range(len(groups) - 1))
    for start, end, skip in groups:
        assert skip == 3000 - max(widths[start:end])
    assert len(groups) > 1  # long and short rows are not padded to one width
    assert _row_groups([10, 9, 8], 10) == [(0, 3, 0)]  # too small to be worth a group each
    assert GROUP_COST > 0


def test_prefix_cache_is_reused_and_dropped_when_the_weights_change(
    policy: ModelPolicy, tasks: list[Task]
) -> None:
    """The shared prefix is encoded once across calls, and an in-place weight update (what an
    optimizer step does) makes the next call encode it again: never stale keys and values."""
    from tracetune.agent.decoding import PrefixCache, decode_batch

    env = SupportDesk()
    request = TurnRequest(0, 0, tasks[0], env.reset(tasks[0]), env.tool_schemas())
    prompt = policy.encode(request)
    n = policy.shared_prefix_len([request], [prompt])
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "stop_ids": [], "pad_id": policy.pad_id,
              "keep_logprobs": True}  # fmt: skip
    cache = PrefixCache()
    with torch_threads_1():
        [a] = decode_batch(policy.model, [prompt], prefix_len=n, prefix_cache=cache, **kwargs)
        [b] = decode_batch(policy.model, [prompt], prefix_len=n, prefix_cache=cache, **kwargs)
        assert (cache.misses, cache.hits) == (1, 1) and a.token_ids == b.token_ids
        weight = policy.model.get_input_embeddings().weight
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.add_(torch.randn_like(weight) * 0.5)  # in place, like optimizer.step()
            [changed] = decode_batch(
                policy.model, [prompt], prefix_len=n, prefix_cache=cache, **kwargs
            )
            [fresh] = decode_batch(policy.model, [prompt], prefix_len=n, **kwargs)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    assert cache.misses == 2  # the update was noticed
    assert changed.token_ids == fresh.token_ids
    assert changed.logprobs == fresh.logprobs


def test_thread_count_follows_the_size_of_each_forward() -> None:
    """Small forwards keep the caller's thread count, big ones get the wide one, and the
    caller's count comes back at the end; a wide count no bigger than it changes nothing."""
    from tracetune.agent.decoding import WIDE_TOKENS, _Threads
    from tracetune.agent.rollout import torch_threads

    with torch_threads(1):
        threads = _Threads(2)
        threads.for_tokens(WIDE_TOKENS - 1)
        assert torch.get_num_threads() == 1
        threads.for_tokens(WIDE_TOKENS)
        assert torch.get_num_threads() == 2
        threads.for_tokens(1)
        assert torch.get_num_threads() == 1
        threads.for_tokens(10 * WIDE_TOKENS)
        threads.restore()
        assert torch.get_num_threads() == 1
        same = _Threads(1)
        same.for_tokens(10 * WIDE_TOKENS)
        assert same.wide is None and torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), _Threads(2) as failing:  # a forward that raised
            failing.for_tokens(WIDE_TOKENS)
            raise RuntimeError("forward failed")
        assert torch.get_num_threads() == 1


def test_wide_threads_change_neither_tokens_nor_the_callers_setting(
    policy: ModelPolicy, tasks: list[Task]
) -> None:
    """The auto thread policy (2 threads for the big forwards) decodes the same tokens as one
    thread throughout, and leaves torch at the caller's thread count afterwards."""
    from tracetune.agent.decoding import decode_batch

    env = SupportDesk()
    requests = [TurnRequest(i, 0, t, env.reset(t), env.tool_schemas()) for i, t in enumerate(tasks)]
    prompts = [policy.encode(r) for r in requests]
    kwargs: dict[str, Any] = {
        "max_new_tokens": 12,
        "stop_ids": policy.stop_ids,
        "pad_id": policy.pad_id,
        "prefix_len": policy.shared_prefix_len(requests, prompts),
        "keep_logprobs": True,
    }
    with torch_threads_1():
        narrow = decode_batch(policy.model, prompts, **kwargs)
        wide = decode_batch(policy.model, prompts, wide_threads=2, **kwargs)
        assert torch.get_num_threads() == 1
    assert [o.token_ids for o in wide] == [o.token_ids for o in narrow]
    for w, n in zip(wide, narrow, strict=True):
        assert w.logprobs == pytest.approx(n.logprobs, abs=1e-4)


def test_auto_threads_use_every_core_only_for_big_forwards(model_dir: Path) -> None:
    """A small CPU model: one thread by default, torch's own count for the big forwards;
    an explicit thread count turns the wide setting off."""
    from tracetune.agent.rollout import torch_threads

    with torch_threads(2):
        auto = ModelPolicy.from_pretrained(model_dir, name="t")
        fixed = ModelPolicy.from_pretrained(model_dir, name="t", cpu_threads=1)
    assert (auto.cpu_threads, auto.wide_threads) == (1, 2)
    assert (fixed.cpu_threads, fixed.wide_threads) == (1, None)


def test_cpu_time_of_other_processes_is_the_machines_minus_ours() -> None:
    from tracetune.agent.rollout import CpuSample, others_busy_cores

    before = CpuSample(machine_busy_s=100.0, own_s=10.0, at=50.0)
    after = CpuSample(machine_busy_s=103.0, own_s=11.0, at=52.0)  # 3 s busy, 1 s ours, in 2 s
    assert others_busy_cores(before, after) == pytest.approx(1.0)
    assert others_busy_cores(after, after) == 0.0
    assert others_busy_cores(before, CpuSample(100.5, 11.0, 52.0)) == 0.0  # never negative


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux /proc/stat")
def test_wide_threads_are_withheld_while_another_process_keeps_a_core_busy() -> None:
    """A real busy process: the machine's CPU time minus ours shows it, and a forward split
    over every core is refused (a split forward would wait for that core)."""
    import subprocess
    import sys
    import time

    from tracetune.agent.rollout import CpuContention

    contention = CpuContention()
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"]
    )
    try:
        time.sleep(CpuContention.WINDOW_S + 0.5)
        allowed = contention.allows(contention.cores)
    finally:
        busy.kill()
        busy.wait()
    assert contention.others is not None and contention.others >= 0.6  # measured, not assumed
    assert allowed is False


def test_core_count_without_an_affinity_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the OS has no `sched_getaffinity` (macOS), the machine's core count is used."""
    import os

    from tracetune.agent.rollout import CpuContention, usable_cores

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == (os.cpu_count() or 1)
    assert CpuContention().cores == usable_cores()
