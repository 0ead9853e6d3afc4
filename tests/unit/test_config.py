"""params.yaml is read through one typed schema that names the offending key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tracetune.config import Params, ParamsError, check_environment, load_params, parse_params

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


def test_schema_defaults_are_the_shipped_params_file() -> None:
    """One source of truth: an omitted key (or an empty params.yaml) means what the shipped
    file says, never an older value left in the schema (it once said 3 SFT epochs, the file 4)."""
    assert parse_params({}) == load_params(REPO / "params.yaml")


def test_empty_params_file_gives_the_shipped_values(tmp_path: Path) -> None:
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    assert load_params(empty).sft.epochs == load_params(REPO / "params.yaml").sft.epochs == 4


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"sft": {"max_steps": -5}}, r"sft\.max_steps"),
        ({"sft": {"max_steps": 0}}, r"sft\.max_steps"),
        ({"simulate": {"seed": -1}}, r"simulate\.seed"),
        ({"split": {"seed": -3}}, r"split\.seed"),
        ({"sft": {"save_steps": 0}}, r"sft\.save_steps"),
        ({"rlvr": {"steps": -1}}, r"rlvr\.steps"),
        ({"simulate": {"faults": {"wrong_answer": -0.1}}}, r"simulate\.faults\.wrong_answer"),
        ({"split": {"heldout_fraction": 1.5}}, r"split\.heldout_fraction"),
        ({"ingest": {"max_quarantine_rate": 2}}, r"ingest\.max_quarantine_rate"),
    ],
)
def test_out_of_range_values_name_the_file_and_key(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=rf"(?s){re.escape(str(path))}.*{key}"):
        load_params(path)


def test_no_limit_is_minus_one() -> None:
    assert parse_params({"sft": {"max_steps": -1}}).sft.max_steps == -1
    assert parse_params({"sft": {"max_steps": 30}}).sft.max_steps == 30


class NotAnEnvironment:
    def __init__(self, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("environment", "key", "says"),
    [
        ({"class_path": "no_such_package.Env"}, "class_path", "cannot import"),
        ({"class_path": "tracetune.environments.support_desk.Nope"}, "class_path", "no attribute"),
        ({"class_path": "Env"}, "class_path", "module.Class"),
        ({"class_path": f"{__name__}.NotAnEnvironment"}, "class_path", "not a tracetune"),
        ({"class_path": "collections.OrderedDict"}, "class_path", "not a tracetune"),
        ({"kwargs": {"db_seed": 1, "colour": "red"}}, "kwargs", "unexpected keyword"),
        ({"kwargs": {"n_customers": "many"}}, "kwargs", "SupportDesk(**kwargs).tasks(1) failed"),
    ],
)
def test_check_environment_builds_it_and_names_the_key(
    environment: dict[str, Any], key: str, says: str
) -> None:
    params = parse_params({"environment": environment})
    with pytest.raises(
        ParamsError, match=rf"(?s)my/params\.yaml.*environment\.{key}:.*{re.escape(says)}"
    ):
        check_environment(params.environment, "my/params.yaml")


def test_check_environment_accepts_the_shipped_environment() -> None:
    check_environment(load_params(REPO / "params.yaml").environment, "params.yaml")
