"""SFT on a real tiny model with real TRL/PEFT steps: loss, masks, LoRA, resume, merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.template import IM_END
from tracetune.config import SFTParams
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.sft import build_dataset, read_trajectories, train_sft

TOOLS = SupportDesk().tool_schemas()


def _params(**kw: Any) -> SFTParams:
    base: dict[str, Any] = {
        "use_lora": False,
        "max_steps": 8,
        "learning_rate": 3e-3,
        "batch_size": 4,
        "max_length": 2048,
        "logging_steps": 1,
        "save_steps": 100,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "max_examples": 24,
    }
    return SFTParams.model_validate(base | kw)


def test_loss_mask_trains_only_assistant_output_and_its_end_token(
    tiny_base: Path, golden_train: Path
) -> None:
    from tracetune.agent.model import load_tokenizer

    tok = load_tokenizer(tiny_base)
    rows = read_trajectories(golden_train, 5)
    dataset, cuts = build_dataset(tok, rows, TOOLS, 4096)
    assert cuts.turns_dropped == 0 and cuts.windowed == 0 and len(dataset) == 5
    end_id = tok.convert_tokens_to_ids(IM_END)
    for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"], strict=True):
        text_trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        text_masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
        assert "<tool_call>" in text_trained  # tool calls are learned
        assert "Acme Store" in text_masked and "<tool_response>" in text_masked  # system, tools
        assert "<tool_response>" not in text_trained and "<|im_start|>user" not in text_trained
        ends = [i for i, t in enumerate(ids) if t == end_id]
        n_assistant = sum(1 for i in ends if mask[i])
        assert n_assistant >= 2  # each assistant turn's <|im_end|> is trained
        assert not mask[ends[0]]  # the system turn's end is not


def test_full_finetune_loss_falls(
    tiny_base: Path, golden_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train_sft(
        _params(max_steps=10),
        str(tiny_base),
        golden_train,
        TOOLS,
        tmp_path / "sft",
        tmp_path / "ck",
    )
    assert result.steps == 10
    assert result.final_loss is not None and result.first_loss is not None
    assert result.final_loss < result.first_loss * 0.9
    assert (tmp_path / "sft" / "merged" / "config.json").exists()
    assert not (tmp_path / "sft" / "adapter").exists()
    # The console: one short rounded line per logged step, never TRL's log dict.
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    lines = [line for line in printed.splitlines() if line.startswith("sft step ")]
    assert len(lines) == 10 and lines[-1].startswith("sft step 10/10  loss "), printed
    assert "{'loss'" not in printed and "train_runtime" not in printed
    assert all(len(line) < 100 for line in lines), lines


def test_lora_trains_adapter_only_and_merge_matches(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = _params(use_lora=True, max_steps=4, learning_rate=1e-2)
    train_sft(params, str(tiny_base), golden_train, TOOLS, tmp_path / "sft", tmp_path / "ck")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(tmp_path / "sft" / "adapter"))
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    for name, value in peft.get_base_model().state_dict().items():
        if "lora_" not in name and "base_layer" not in name and name in base_state:
            assert torch.equal(value, base_state[name]), name
    for name, value in peft.get_base_model().state_dict().items():
        if ".base_layer." in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(value, base_state[original]), name
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft" / "merged"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12]])
    with torch.no_grad():
        a = peft.eval()(ids).logits
        b = merged.eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    pristine = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    with torch.no_grad():
        assert not torch.allclose(a, pristine(ids).logits, atol=1e-4)  # the adapter matters


class _Crash(Exception):
    pass


def test_crashed_run_resumes_from_last_checkpoint(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                raise _Crash("simulated crash")

    params = _params(max_steps=5, save_steps=2)
    out, ck = tmp_path / "sft", tmp_path / "ck"
    with pytest.raises(_Crash):
        train_sft(params, str(tiny_base), golden_train, TOOLS, out, ck, callbacks=[CrashAt()])
    assert (ck / "checkpoint-2").exists()
    result = train_sft(params, str(tiny_base), golden_train, TOOLS, out, ck)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-2")
    assert result.steps == 5
    changed = _params(max_steps=5, save_steps=2, learning_rate=1e-3)
    fresh = train_sft(changed, str(tiny_base), golden_train, TOOLS, out, ck)
    assert fresh.resumed_from is None  # another run's checkpoints are never resumed


def test_a_base_rebuilt_in_place_trains_afresh_instead_of_resuming(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    """A finished run's checkpoints must not outlive its base model.

    Found on 2026-12-06: after `models/base` was rebuilt with a new tokenizer, the sft stage
    "resumed" the old run's final checkpoint, trained 0 steps and saved the old weights beside
    the new tokenizer (held-out TSR 0.000). The run identity now hashes the base's content.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    params = _params(max_steps=2, save_steps=1)
    out, ck = tmp_path / "sft", tmp_path / "ck"
    first = train_sft(params, str(base), golden_train, TOOLS, out, ck)
    assert first.steps == 2 and (ck / "checkpoint-2").exists()
    first_model = AutoModelForCausalLM.from_pretrained(out / "merged")
    first_weights = first_model.get_input_embeddings().weight.detach().clone()

    rebuilt = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for weight in rebuilt.parameters():
            weight.mul_(0.5)
    rebuilt.save_pretrained(base)  # same path, same params, same data: only the weights differ
    again = train_sft(params, str(base), golden_train, TOOLS, out, ck)
    assert again.resumed_from is None
    assert again.steps == 2
    trained = AutoModelForCausalLM.from_pretrained(out / "merged")
    # with the stale resume, the "new" model was the first run's, weight for weight
    assert not torch.allclose(trained.get_input_embeddings().weight, first_weights)


def test_accelerate_launch_two_processes_trains_once_and_tracks_once(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    """The multi-GPU path (`accelerate launch`, infra/accelerate) as DDP on two CPU processes:
    both ranks train, rank 0 alone writes the model, the metrics and one MLflow run."""
    import os
    import shutil
    import subprocess
    import sys

    import mlflow
    import yaml

    repo = Path(__file__).resolve().parents[2]
    curated = tmp_path / "data" / "curated"
    curated.mkdir(parents=True)
    shutil.copy(golden_train, curated / "train.jsonl")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base_model"]["name_or_path"] = str(tiny_base)
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["tracking"]["artifact_location"] = str(tmp_path / "mlartifacts")
    params["sft"] |= {"max_steps": 4, "max_examples": 16, "batch_size": 2, "logging_steps": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(repo)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    config = repo / "infra" / "accelerate" / "cpu_ddp.yaml"
    done = subprocess.run(
        [*launch, "--config_file", str(config), "-m", "tasks.sft"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "models" / "sft" / "merged" / "config.json").exists()
    assert (tmp_path / "metrics" / "sft.json").exists()
    mlflow.set_tracking_uri(params["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=[params["tracking"]["experiment"]])
    assert len(runs) == 1


def _loss_and_grads(
    trainer: Any, model: Any, batch: dict[str, Any], share: bool
) -> tuple[float, dict[str, Any]]:
    import tracetune.training.prefix as prefix

    model.zero_grad()
    saved = prefix.MIN_SHARED
    prefix.MIN_SHARED = 16 if share else 10**9  # 10**9: never split, the plain TRL batch
    try:
        loss = trainer.compute_loss(model, dict(batch))
    finally:
        prefix.MIN_SHARED = saved
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prefix_gives_the_plain_batch_loss_and_gradients(
    tiny_base: Path, golden_train: Path, tmp_path: Path, lora: bool
) -> None:
    """The shared-prefix split (prefix once, its cache repeated per row) is the same training
    step as TRL's plain batch: same loss, same gradient on every trained parameter."""
    import torch

    from tracetune.agent.model import load_model
    from tracetune.training.prefix import prefix_sharing_trainer, shared_prefix_length
    from tracetune.training.sft import attach_lora, trainer_config

    torch.manual_seed(0)
    model, tok = load_model(str(tiny_base))
    tok.padding_side = "right"
    params = _params(use_lora=lora, lora={"dropout": 0.0})
    if lora:
        model = attach_lora(model, params)
        for name, p in model.named_parameters():  # B starts at zero: give the adapter a say
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    dataset, _ = build_dataset(tok, read_trajectories(golden_train, 8), TOOLS, 2048)
    trainer = prefix_sharing_trainer()(
        model=model,
        args=trainer_config(params, tmp_path / "ck", False, []),
        train_dataset=dataset,
        processing_class=tok,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    cut = shared_prefix_length(batch["input_ids"], batch["labels"])
    assert cut > 400  # the system turn and the tool schemas are shared
    assert (batch["labels"][:, : cut + 1] == -100).all()  # and none of it is trained
    plain_loss, plain = _loss_and_grads(trainer, model, batch, share=False)
    shared_loss, shared = _loss_and_grads(trainer, model, batch, share=True)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == shared.keys() and plain
    for name, grad in plain.items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((grad - shared[name]).abs().max()) / scale < 1e-4, name


def test_shared_prefix_length_rules() -> None:
    import torch

    from tracetune.training.prefix import MIN_SHARED, shared_prefix_length

    ids = torch.arange(40).repeat(3, 1)
    ids[1, 30:] = 99  # rows part at 30
    labels = torch.full_like(ids, -100)
    labels[:, 35:] = ids[:, 35:]
    assert shared_prefix_length(ids, labels) == 30
    labels[2, 20] = 7  # a trained token before the rows part: cut before it
    assert shared_prefix_length(ids, labels) == 20
    labels[0, MIN_SHARED - 1] = 7  # too little left to share
    assert shared_prefix_length(ids, labels) == 0
    assert shared_prefix_length(ids[:1], labels[:1]) == 0  # one row: nothing to share


def test_rekeyed_ids_train_one_fresh_copy_per_epoch(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    params = _params(max_steps=-1, epochs=2, max_examples=8, rekey_ids=[r"\b[OCP]-\d+\b"])
    result = train_sft(params, str(tiny_base), golden_train, TOOLS, tmp_path / "s", tmp_path / "c")
    assert result.examples == 8 and result.epochs == pytest.approx(2.0)
    assert result.steps == 4  # 2 re-keyed copies of 8 examples, batch 4, one trainer epoch
    plain = train_sft(
        _params(max_steps=-1, epochs=2, max_examples=8),
        str(tiny_base),
        golden_train,
        TOOLS,
        tmp_path / "s2",
        tmp_path / "c2",
    )
    assert plain.train_tokens == pytest.approx(result.train_tokens, rel=0.05)  # per epoch


def test_family_mix_trains_one_redrawn_epoch_per_epoch(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    params = _params(max_steps=-1, epochs=2, max_examples=12, family_alpha=0.0)
    result = train_sft(params, str(tiny_base), golden_train, TOOLS, tmp_path / "s", tmp_path / "c")
    assert result.examples == 12 and result.epochs == pytest.approx(2.0)
    assert result.steps == 6  # 2 re-drawn epochs of 12 examples, batch 4, one trainer epoch
    assert result.final_loss is not None and result.first_loss is not None


# --- long conversations (issue 18, item 5) -------------------------------------------------
def long_sessions(golden_train: Path, n: int = 3, per: int = 8) -> list[dict[str, Any]]:
    """Foreign-harness sessions: a ~2.7k-token policy as system prompt, `per` requests in one
    conversation (4.8k to 8k tokens on the tiny tokenizer), ending with the user's goodbye."""
    from foreign_support import long_policy, long_session

    episodes = read_trajectories(golden_train)
    policy = long_policy(20)
    return [
        {"family": "session", "messages": long_session(episodes[i * per : (i + 1) * per], policy)}
        for i in range(n)
    ]


def test_a_long_conversation_becomes_windows_that_train_each_turn_once(
    tiny_base: Path, golden_train: Path
) -> None:
    from tracetune.agent.model import load_tokenizer

    tok = load_tokenizer(tiny_base)
    end_id = tok.convert_tokens_to_ids(IM_END)
    for session in long_sessions(golden_train):
        messages = session["messages"]
        turns = [m for m in messages if m["role"] == "assistant"]
        dataset, cuts = build_dataset(tok, [session], TOOLS, 2048, context=2048)
        assert cuts.windowed == 1 and cuts.over_context == 1 and cuts.longest > 4000
        assert cuts.turns_dropped == 0 and cuts.turns_trained == len(turns)
        assert cuts.system_prompts_cut == 1 and cuts.system_tokens_cut > 1000
        assert cuts.tail_messages_cut == 1 and cuts.history_tokens_cut > 0
        rows = list(zip(dataset["input_ids"], dataset["assistant_masks"], strict=True))
        assert len(rows) == cuts.examples > 1
        trained_ends = 0
        for ids, mask in rows:
            assert len(ids) <= 2048
            head = tok.decode(ids[:64])
            assert "Clause 1:" in head  # the system prompt's head stays in every window
            trained_ends += sum(1 for i, t in enumerate(ids) if t == end_id and mask[i])
            assert "Bye!" not in tok.decode(ids)  # nothing after the last answer
        assert trained_ends == len(turns)  # every assistant turn trained exactly once
        first_ids = rows[0][0]
        common = next(
            (k for k in range(len(first_ids)) if any(r[0][k] != first_ids[k] for r in rows)),
            len(first_ids),
        )
        assert common > 900  # one system turn for all windows: shared-prefix batches share it
        last_ids, last_mask = rows[-1]
        trained = tok.decode([t for t, m in zip(last_ids, last_mask, strict=True) if m])
        assert turns[-1]["content"] in trained  # the latest turns stay
        first_question = next(m["content"] for m in messages if m["role"] == "user")
        assert first_question not in tok.decode(last_ids)  # the oldest ones went


def test_long_conversations_train_on_defaults_and_report_the_cuts(
    tiny_base: Path, golden_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18: SFT stopped with "no training example fits max_length=2048" on logs of 4.4k
    to 9.2k-token conversations behind a long policy. Now they train, and the stage says what
    it cut (metrics + warnings), including conversations beyond the model's context."""
    import json
    import logging

    train = tmp_path / "train.jsonl"
    sessions = long_sessions(golden_train)
    train.write_text("".join(json.dumps(s) + "\n" for s in sessions))
    with caplog.at_level(logging.WARNING, logger="tracetune.training.sft"):
        result = train_sft(
            _params(max_steps=2), str(tiny_base), train, TOOLS, tmp_path / "o", tmp_path / "c"
        )
    assert result.steps == 2 and result.examples > len(sessions)
    metrics = result.metrics()
    assert metrics["cut_windowed"] == len(sessions) and metrics["cut_turns_dropped"] == 0
    assert metrics["cut_examples"] == result.examples and metrics["dropped_too_long"] == 0
    assert metrics["cut_system_prompts_cut"] == len(sessions)
    assert metrics["cut_over_context"] == len(sessions) and metrics["max_length"] == 2048
    logged = caplog.text
    assert "longer than sft.max_length=2048" in logged
    assert "longer than the model's context (2048 tokens)" in logged
    assert "system prompt of 3 conversations was cut" in logged


def test_max_length_beyond_the_model_context_is_capped_with_a_warning(
    tiny_base: Path, golden_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="tracetune.training.sft"):
        result = train_sft(
            _params(max_steps=1, max_length=8192, max_examples=4),
            str(tiny_base),
            golden_train,
            TOOLS,
            tmp_path / "o",
            tmp_path / "c",
        )
    assert result.max_length == 2048 and result.steps == 1
    assert "sft.max_length=8192 is longer than the model's context (2048)" in caplog.text


def test_resuming_at_the_final_checkpoint_changes_nothing(
    tiny_base: Path, golden_train: Path, tmp_path: Path
) -> None:
    """A run killed after its last checkpoint (during the final save, say) reruns into the
    same result: no extra step (it once wrote checkpoint-3 for max_steps 2), the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    params = _params(max_steps=2, save_steps=2)
    out, ck = tmp_path / "sft", tmp_path / "ck"
    first = train_sft(params, str(tiny_base), golden_train, TOOLS, out, ck)
    assert first.steps == 2 and (ck / "checkpoint-2").exists()
    weights = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()

    again = train_sft(params, str(tiny_base), golden_train, TOOLS, out, ck)
    assert again.resumed_from is not None and again.resumed_from.endswith("checkpoint-2")
    assert again.steps == 2
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert again.final_loss == first.final_loss
