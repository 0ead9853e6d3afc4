"""Helpers for the registry tests: a tiny real model, eval files of the real shape, stores.

Nothing here is mocked: the model is a real (random) Qwen2 with a real BPE tokenizer and our
chat template; stores are real MLflow SQLite files or a real `mlflow server` on loopback.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml
from params_support import paths_under, tracking_under

from tracetune.config import Params, parse_params

# A 1x1 PNG, so that "plots" are real image files without importing matplotlib.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
FAMILIES = ("lookup_order", "refund_latest_order")
# Imported once by the fork server of `run_concurrently` (modules only: no store is opened).
PRELOAD = [
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.model_registry.rest_store",
    "tracetune.registry.approval",
    "tracetune.registry.register",
    "registry_support",
]


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Qwen2 (hidden 32) with a ~300-token byte-level BPE and our chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from tracetune.agent.template import (
        END_OF_TEXT,
        IM_END,
        IM_START,
        RESPONSE_TEMPLATE,
        TOOL_TAGS,
        load_chat_template,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ['{"name": "get_order", "arguments": {"order_id": "O-1"}} customer email refund'] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT, padding_side="left"
    )
    tokenizer.chat_template = load_chat_template()
    tokenizer.response_template = RESPONSE_TEMPLATE
    vocab = tokenizer.get_vocab()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=vocab[END_OF_TEXT],
        eos_token_id=vocab[IM_END],
        pad_token_id=vocab[END_OF_TEXT],
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[vocab[IM_END], vocab[END_OF_TEXT]], pad_token_id=vocab[END_OF_TEXT]
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return round(centre - half, 4), round(centre + half, 4)


def arm(tsr: float, n: int = 200, steps: float = 3.0, cost: float = 0.001) -> dict[str, Any]:
    """One `M` block of the eval file (the shape the evaluation stage writes)."""
    low, high = _wilson(tsr, n)
    return {
        "tsr": tsr,
        "tsr_ci_low": low,
        "tsr_ci_high": high,
        "n": n,
        "steps_mean": steps,
        "steps_median": steps,
        "tokens_in": 900.0,
        "tokens_out": 60.0,
        "cost_per_task_usd": cost,
        "latency_s": 0.2,
        "per_family": {f: {"tsr": tsr, "n": n // len(FAMILIES)} for f in FAMILIES},
        "failures": {"wrong_answer": int(n * (1 - tsr))},
    }


def eval_metrics(
    candidate: str = "sft",
    model_path: str = "models/sft",
    tsr: float = 0.85,
    prompt_only: float = 0.1,
    production: float = 0.73,
    n: int = 200,
    steps: float = 3.0,
    cost: float = 0.001,
    floor: float = 0.0,
) -> dict[str, Any]:
    """A whole `metrics/eval_<model>.json`."""
    cand, prod, base = arm(tsr, n, steps, cost), arm(production, n, 3.4), arm(prompt_only, n, 6.0)
    return {
        "model": candidate,
        "model_path": model_path,
        "n_tasks": n,
        "candidate": cand,
        "baseline_prompt_only": base,
        "baseline_production": prod,
        "baseline_floor": arm(floor, n, 1.0, 0.0),
        "delta": {
            "tsr_vs_prompt_only": tsr - prompt_only,
            "tsr_vs_production": tsr - production,
            "steps_vs_production": steps - 3.4,
            "cost_vs_production": cost - prod["cost_per_task_usd"],
            "tsr_vs_floor": tsr - floor,
        },
    }


def write_eval(root: Path, candidate: str, metrics: dict[str, Any]) -> Path:
    """The eval file plus `reports/eval/<candidate>/report.md` and a plot, under `root`."""
    path = root / "metrics" / f"eval_{candidate}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
    report = root / "reports" / "eval" / candidate
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.md").write_text(
        f"# Evaluation of {candidate}\n\nTSR {metrics['candidate']['tsr']}\n"
    )
    (report / "tsr_by_family.png").write_bytes(PNG_1X1)
    return path


def write_dvc_lock(root: Path, model_rel: str = "models/sft") -> Path:
    """A dvc.lock with the curated files and the model directory as outs."""
    lock = {
        "schema": "2.0",
        "stages": {
            "split": {
                "cmd": "python -m tasks.split",
                "outs": [
                    {
                        "path": "data/curated/train.jsonl",
                        "hash": "md5",
                        "md5": "a" * 32,
                        "size": 10,
                    },
                    {
                        "path": "data/curated/heldout.jsonl",
                        "hash": "md5",
                        "md5": "b" * 32,
                        "size": 5,
                    },
                ],
            },
            "sft": {
                "cmd": "python -m tasks.sft",
                "outs": [{"path": model_rel, "hash": "md5", "md5": "c" * 32 + ".dir", "nfiles": 6}],
            },
        },
    }
    path = root / "dvc.lock"
    path.write_text(yaml.safe_dump(lock))
    return path


def params_dict(root: Path, tracking_uri: str, model_name: str, **registry: Any) -> dict[str, Any]:
    """params.yaml content with every path under `root` and the given store/model."""
    gate = {
        "min_tsr": 0.5,
        "max_steps_per_task": 10,
        "max_cost_per_task_usd": 0.005,
        "min_margin_vs_prompt_only": 0.05,
        "min_margin_vs_production": 0.0,
        "champion_non_inferiority_margin": 0.1,
        "use_confidence_intervals": True,
    } | registry.pop("gate", {})
    return {
        "paths": paths_under(root),
        "tracking": tracking_under(
            root,
            tracking_uri=tracking_uri,
            experiment="tracetune-test",
            registered_model=model_name,
        ),
        "registry": {"gate": gate, "lock_timeout_s": 60} | registry,
    }


def make_params(root: Path, tracking_uri: str, model_name: str, **registry: Any) -> Params:
    return parse_params(params_dict(root, tracking_uri, model_name, **registry))


def write_params(root: Path, tracking_uri: str, model_name: str, **registry: Any) -> Path:
    path = root / f"params-{model_name}.yaml"
    path.write_text(yaml.safe_dump(params_dict(root, tracking_uri, model_name, **registry)))
    return path


def add_bare_version(client: Any, name: str, passed: bool = True, tsr: float = 0.85) -> str:
    """A version without model files, tagged like a registered one (for registry-only tests)."""
    from mlflow.exceptions import MlflowException

    with suppress(MlflowException):
        client.create_registered_model(name)
    block = arm(tsr)
    tags = {
        "tracetune.gate.verdict": "passed" if passed else "failed",
        "tracetune.gate.reasons": json.dumps(["PASS ok"] if passed else ["FAIL TSR too low"]),
        "tracetune.eval": json.dumps(block),
        "tracetune.gate.champion": "none",
        "tracetune.gate.params": json.dumps({"champion_non_inferiority_margin": 0.1}),
    }
    mv = client.create_model_version(name, "s3://tracetune-test/bare-model", tags=tags)
    return str(mv.version)


def fresh_mlflow_env() -> None:
    """Forget the store of an earlier test: `mlflow.set_tracking_uri` exports
    MLFLOW_TRACKING_URI, which tracetune (rightly, for servers) ranks above params."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """A real `mlflow server` on loopback (SQLite backend); yields its URI; torn down after."""
    from mlflow import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    backend = f"sqlite:///{root / 'server.db'}"
    # Create the schema here: a server migrating a fresh SQLite file under load was seen to
    # fail its own start-up ("Online migration expected to match one row").
    MlflowClient(tracking_uri=backend, registry_uri=backend).search_registered_models()
    port = free_port()
    log = (root / "server.log").open("w")
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(root / "server-artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    # No job runner (huey workers for GenAI evaluation jobs): nothing here needs it, and it
    # costs start-up time and CPU.
    env = dict(
        os.environ,
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout_s} s")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def approve_worker(
    barrier: Any, out: str, params: dict[str, Any], version: str, action: str = "approve"
) -> None:
    """One promoter process: wait for the others, then approve (or roll back) concurrently."""
    fresh_mlflow_env()
    from tracetune.config import parse_params
    from tracetune.registry.approval import approve, rollback
    from tracetune.registry.client import open_registry

    loaded = parse_params(params)
    registry = open_registry(loaded.tracking, lock_timeout_s=loaded.registry.lock_timeout_s)
    registry.aliases()  # connect (and import) before the race starts
    barrier.wait(120)
    try:
        if action == "approve":
            decision = approve(registry, version, f"worker-{version}", "concurrent")
        else:
            decision = rollback(registry, f"worker-{version}", "concurrent")
        result = {"ok": True, "message": decision.message}
    except Exception as exc:  # reported to the test, which asserts on it
        result = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps(result))


def register_worker(barrier: Any, out: str, params: dict[str, Any], root: str) -> None:
    """One registering process (the `register` stage run twice at the same time)."""
    fresh_mlflow_env()
    from tracetune.config import parse_params
    from tracetune.registry.register import register_candidate

    loaded = parse_params(params)
    barrier.wait(300)
    try:
        result = register_candidate(
            loaded, "sft", dvc_lock=Path(root) / "dvc.lock", params_file=None
        )
        payload = {"ok": True, **result.as_dict()}
    except Exception as exc:
        payload = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps(payload, default=str))


def run_concurrently(
    target: Any, arg_lists: list[tuple[Any, ...]], tmp: Path
) -> list[dict[str, Any]]:
    """Start one process per argument tuple behind a shared barrier; their results.

    Processes come from a fork server that imported MLflow once (importing it in each spawned
    child costs seconds) but never opened a store: no database connection crosses a fork.
    """
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    barrier = ctx.Barrier(len(arg_lists))
    outs = [tmp / f"result-{i}.json" for i in range(len(arg_lists))]
    procs = [
        ctx.Process(target=target, args=(barrier, str(out), *args))
        for args, out in zip(arg_lists, outs, strict=True)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(600)
        assert proc.exitcode == 0, f"worker exited {proc.exitcode}"
    return [json.loads(out.read_text()) for out in outs]
