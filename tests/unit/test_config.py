"""params.yaml is read through one typed schema that names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tracetune.config import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).parents[2]


def test_repository_params_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.environment.max_steps == 15


def test_params_yaml_sets_every_key_the_schema_has() -> None:
    """One source of truth: defaults in code and values in params.yaml must not drift apart."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields)


def test_unknown_key_is_rejected_with_its_path() -> None:
    with pytest.raises(ParamsError, match=r"simulate\.faults\.wrong_tol: unknown key"):
        parse_params({"simulate": {"faults": {"wrong_tol": 0.1}}})
    with pytest.raises(ParamsError, match=r"nonsense: unknown key"):
        parse_params({"nonsense": 1})


def test_wrong_type_and_range_are_rejected_with_the_path() -> None:
    with pytest.raises(ParamsError, match=r"simulate\.n_trajectories"):
        parse_params({"simulate": {"n_trajectories": "many"}})
    with pytest.raises(ParamsError, match=r"simulate\.faults\.overlong"):
        parse_params({"simulate": {"faults": {"overlong": 1.5}}})


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("simulate: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
