"""RLVR on a real tiny model with real TRL GRPO steps: weights move, health is logged, the
recipe's rule skips training when SFT is good enough, token-in prompts match the template."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from params_support import paths_under, tracking_under

from tracetune.config import RLVRHealthParams, RLVRParams, parse_params
from tracetune.environments.base import Outcome
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.grpo import Decision, TracePolicy, train_rlvr, training_tasks
from tracetune.training.health import ZERO_ADVANTAGE, health_callback


class ParityDesk(SupportDesk):
    """The support desk with a toy verifier: success when the answer has an even length.

    A near-random tiny model never solves a real task, so every group would get one reward and
    GRPO would not move; this verifier gives about half the episodes a success whatever the
    model writes (and shows that any `Environment` subclass plugs into RLVR).
    """

    def verify(self, final_answer: str | None) -> Outcome:
        ok = final_answer is not None and len(final_answer.strip()) % 2 == 0
        return Outcome(ok, 1.0 if ok else -1.0, {})


LOGGED = (
    "reward",
    "reward_std",
    "kl",
    "completions/mean_length",
    "rewards/outcome/mean",
    "health/zero_advantage_share",
    "health/tool_call_rate",
    "health/success_rate",
    "health/mean_steps",
    "health/completion_tokens",
)


def _params(**kw: Any) -> RLVRParams:
    base: dict[str, Any] = {
        "mode": "always",
        "steps": 2,
        "group_size": 4,
        "tasks_per_step": 2,
        "max_new_tokens": 12,
        "max_episode_steps": 2,
        "max_completion_tokens": 96,
        "learning_rate": 1e-3,
        "beta": 0.02,
        "save_steps": 100,
    }
    return RLVRParams.model_validate(base | kw)


def _stage_params(root: Path, rlvr: dict[str, Any]) -> Any:
    """Params for running the `rlvr` stage itself, every path and store under `root`."""
    return parse_params(
        {"paths": paths_under(root), "tracking": tracking_under(root), "rlvr": rlvr}
    )


@pytest.fixture
def sft_dir(tiny_base: Path, tmp_path: Path) -> Path:
    """The tiny base model laid out as the SFT stage writes its output."""
    out = tmp_path / "sft"
    shutil.copytree(tiny_base, out / "merged")
    return out


def test_grpo_steps_change_the_weights_and_log_health(
    sft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    params = _params()
    env = ParityDesk()
    tasks = training_tasks(env, 8, 0, ["order_status", "customer_tier"], set())
    decision = Decision(True, "test", "always", None, 0.8)
    out, checkpoints = tmp_path / "rlvr", tmp_path / "ck"
    factory = functools.partial(ParityDesk, max_steps=2)
    result = train_rlvr(params, sft_dir, tasks, factory, out, checkpoints, decision)

    assert result.ran and result.steps == 2 and result.episodes == 2 * 8
    assert result.episodes_per_second > 0 and result.seconds_per_step > 0
    assert len(result.history) == 2
    for row in result.history:
        assert not [key for key in LOGGED if key not in row]
    assert 0 < sum(r["health/success_rate"] for r in result.history) < 2  # the verifier varied
    assert set(result.train_success_by_family) == {"order_status", "customer_tier"}
    captured = capsys.readouterr()  # one short line per step, never TRL's log dict
    printed = captured.out + captured.err
    lines = [line for line in printed.splitlines() if line.startswith("rlvr step ")]
    assert [line.split("  ")[0] for line in lines] == ["rlvr step 1/2", "rlvr step 2/2"], printed
    assert all(" reward " in line and " kl " in line for line in lines), lines
    assert "{'loss'" not in printed and "'reward'" not in printed

    before = AutoModelForCausalLM.from_pretrained(str(sft_dir / "merged")).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out / "merged")).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "GRPO did not change any weight"
    assert (out / "merged" / "tokenizer_config.json").exists() and not (out / "adapter").exists()


def test_rule_skips_rlvr_when_sft_is_good_enough(tmp_path: Path) -> None:
    from tasks import rlvr as stage

    params = _stage_params(tmp_path, {"when_sft_tsr_below": 0.8})
    merged = tmp_path / "models" / "sft" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"model_type": "qwen2"}')
    (merged / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval_sft.json").write_text(json.dumps({"candidate": {"tsr": 0.86}}))

    result = stage.run(params)

    assert not result.ran and "0.860 >= rlvr.when_sft_tsr_below 0.80" in result.decision["reason"]
    rlvr = tmp_path / "models" / "rlvr"
    assert (rlvr / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert not (rlvr / "merged").is_symlink()
    marker = json.loads((rlvr / "SKIPPED").read_text())
    assert marker["run"] is False and marker["sft_tsr"] == 0.86 and "skipped" in marker["reason"]
    metrics = json.loads((tmp_path / "metrics" / "rlvr.json").read_text())
    assert metrics["ran"] is False and metrics["decision"]["reason"] == marker["reason"]
    assert metrics["mlflow_run_id"]
    curve = (tmp_path / "reports" / "rlvr" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,reward,") and len(curve) == 1
    # every out dvc.yaml lists exists, or `dvc repro` fails the skipped stage
    assert "skipped" in (tmp_path / "models" / "rlvr_checkpoints" / "SKIPPED").read_text()


def test_health_callback_tells_the_trainer_to_stop() -> None:
    from transformers import TrainerControl

    callback = health_callback(RLVRHealthParams(zero_advantage_patience=2))
    control = TrainerControl()
    for step in (1, 2):
        callback.on_log(None, SimpleNamespace(global_step=step), control, logs={ZERO_ADVANTAGE: 1})
    assert control.should_training_stop and callback.stopped_at == 2
    assert callback.reason and "no learning signal" in callback.reason


def test_token_in_prompt_equals_the_rendered_conversation(tiny_base: Path) -> None:
    """When the model writes what the template would, token-in prompts are the template's."""
    from tracetune.agent.model import load_model
    from tracetune.agent.rollout import TurnRequest
    from tracetune.agent.template import assistant_texts, render_messages
    from tracetune.environments.support_desk import oracle_solver
    from tracetune.trajectories.episode import run_scripted

    model, tokenizer = load_model(tiny_base)
    env = SupportDesk()
    task = env.tasks(1, seed=0, families=["order_total_fx"])[0]
    messages = run_scripted(env, task, oracle_solver(task)).messages
    tools = env.tool_schemas()
    policy = TracePolicy(model, tokenizer, "t", max_new_tokens=8, greedy=True)
    said = assistant_texts(messages, tools)
    cuts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn, cut in enumerate(cuts):
        request = TurnRequest(0, turn, task, messages[:cut], tools)
        ids = policy.encode(request)
        expected = render_messages(tokenizer, messages[:cut], tools, add_generation_prompt=True)
        assert tokenizer.decode(ids) == expected
        sampled = tokenizer(said[turn], add_special_tokens=False)["input_ids"]
        policy.traces[0].add_model(sampled, None)
    trace = policy.traces[0]
    model_text = tokenizer.decode(
        [t for t, m in zip(trace.completion_ids, trace.mask, strict=True) if m]
    )
    assert model_text == "".join(said)  # only what the model wrote is trained


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_crashed_rlvr_run_resumes_from_its_last_checkpoint(sft_dir: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                raise _Crash("simulated crash")

    params = _params(steps=4, save_steps=2, group_size=2, tasks_per_step=1)
    tasks = training_tasks(ParityDesk(), 8, 0, ["customer_tier"], set())
    factory = functools.partial(ParityDesk, max_steps=2)
    decision = Decision(True, "test", "always", None, 0.8)
    out, ck = tmp_path / "rlvr", tmp_path / "ck"
    with pytest.raises(_Crash):
        train_rlvr(params, sft_dir, tasks, factory, out, ck, decision, callbacks=[CrashAt()])
    assert (ck / "checkpoint-2").exists()
    result = train_rlvr(params, sft_dir, tasks, factory, out, ck, decision)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-2")
    assert result.steps == 4 and (out / "merged" / "config.json").exists()
    changed = _params(steps=4, save_steps=2, group_size=2, tasks_per_step=1, learning_rate=2e-3)
    fresh = train_rlvr(changed, sft_dir, tasks, factory, out, ck, decision)
    assert fresh.resumed_from is None  # another run's checkpoints are never resumed


class FailingDesk(SupportDesk):
    """Every episode fails: a policy that can never win gives GRPO nothing to learn from."""

    def verify(self, final_answer: str | None) -> Outcome:
        return Outcome(False, -1.0, {"always": "fails"})


def test_screening_trains_only_on_tasks_with_mixed_outcomes(sft_dir: Path, tmp_path: Path) -> None:
    params = _params(screen_episodes=2, tasks_per_step=1)
    tasks = training_tasks(ParityDesk(), 8, 0, ["order_status", "customer_tier"], set())
    decision = Decision(True, "test", "always", None, 0.8)
    factory = functools.partial(ParityDesk, max_steps=2)
    result = train_rlvr(
        params, sft_dir, tasks, factory, tmp_path / "rlvr", tmp_path / "ck", decision
    )
    screening = result.screening
    assert screening is not None and screening["episodes_per_task"] == 2
    assert sum(screening["screened"].values()) == 8
    kept = sum(screening["kept"].values())
    assert 0 < kept < 8  # parity of 2 answers: about half the tasks disagree, half do not
    assert result.ran and result.train_tasks == kept
    assert all(0 < rate < 1 for rate in screening["success"].values())


def test_screening_that_finds_nothing_to_learn_keeps_the_sft_model(
    sft_dir: Path, tmp_path: Path
) -> None:
    params = _params(screen_episodes=2)
    tasks = training_tasks(FailingDesk(), 4, 0, ["order_status"], set())
    decision = Decision(True, "SFT below the bar", "rule", 0.5, 0.8)
    out = tmp_path / "rlvr"
    factory = functools.partial(FailingDesk, max_steps=2)
    result = train_rlvr(params, sft_dir, tasks, factory, out, tmp_path / "ck", decision)

    assert not result.ran and result.steps == 0
    assert "no task with both a success and a failure" in result.decision["reason"]
    assert result.screening is not None and result.screening["success"] == {"order_status": 0.0}
    marker = json.loads((out / "SKIPPED").read_text())
    assert marker["run"] is False and marker["reason"] == result.decision["reason"]
    same = (out / "merged" / "model.safetensors").read_bytes()
    assert same == (sft_dir / "merged" / "model.safetensors").read_bytes()


def test_stage_keeps_the_sft_model_when_the_screen_finds_no_signal(
    tiny_base: Path, tmp_path: Path
) -> None:
    """The real support desk and a barely pre-trained model: no order_status episode succeeds,
    so the stage must skip training, keep the SFT model and leave every out DVC expects."""
    from tasks import rlvr as stage

    screened = _params(screen_episodes=2, n_tasks=3, families=["order_status"])
    params = _stage_params(tmp_path, screened.model_dump(mode="json"))
    shutil.copytree(tiny_base, tmp_path / "models" / "sft" / "merged")

    result = stage.run(params)

    assert not result.ran and result.steps == 0
    assert result.screening is not None and result.screening["success"] == {"order_status": 0.0}
    metrics = json.loads((tmp_path / "metrics" / "rlvr.json").read_text())
    assert metrics["ran"] is False and "no task with both" in metrics["decision"]["reason"]
    assert metrics["screening"]["screened"] == {"order_status": 3}
    rlvr = tmp_path / "models" / "rlvr"
    assert json.loads((rlvr / "SKIPPED").read_text())["reason"] == metrics["decision"]["reason"]
    kept = (rlvr / "merged" / "model.safetensors").read_bytes()
    assert kept == (tiny_base / "model.safetensors").read_bytes()
    assert "no task with both" in (tmp_path / "models" / "rlvr_checkpoints" / "SKIPPED").read_text()


def test_micro_batches_and_checkpointing_keep_the_same_step(sft_dir: Path, tmp_path: Path) -> None:
    """`train_micro_batch` and `activation_checkpointing` cut the loss's memory (a pretrained
    model's long traces ran out of 24 GB at 8 episodes per forward) without changing the step:
    same episodes, same update."""
    import torch
    from transformers import AutoModelForCausalLM

    env = ParityDesk()
    tasks = training_tasks(env, 8, 0, ["order_status", "customer_tier"], set())
    decision = Decision(True, "test", "always", None, 0.8)
    factory = functools.partial(ParityDesk, max_steps=2)
    before = AutoModelForCausalLM.from_pretrained(str(sft_dir / "merged")).state_dict()
    deltas, episodes = [], []
    for micro, recompute in ((None, False), (2, False), (2, True)):
        out = tmp_path / f"rlvr-{micro}-{recompute}"
        params = _params(
            steps=1, train_micro_batch=micro, activation_checkpointing=recompute, beta=0.0
        )
        checkpoints = tmp_path / f"ck-{micro}-{recompute}"
        result = train_rlvr(params, sft_dir, tasks, factory, out, checkpoints, decision)
        episodes.append(result.episodes)
        after = AutoModelForCausalLM.from_pretrained(str(out / "merged")).state_dict()
        deltas.append(torch.cat([(after[k] - before[k]).flatten() for k in before]))
    assert episodes == [8, 8, 8]
    assert deltas[0].norm() > 0
    for delta in deltas[1:]:
        cosine = torch.nn.functional.cosine_similarity(deltas[0], delta, dim=0)
        assert cosine > 0.99, float(cosine)
        assert 0.9 < float(delta.norm() / deltas[0].norm()) < 1.1


def test_micro_batch_must_divide_the_step() -> None:
    from tracetune.training.grpo import micro_batches

    assert micro_batches(_params(train_micro_batch=2)) == (2, 4)
    assert micro_batches(_params()) == (8, 1)
    with pytest.raises(ValueError, match="must divide"):
        micro_batches(_params(train_micro_batch=3))
