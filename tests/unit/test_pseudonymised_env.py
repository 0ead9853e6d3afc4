"""Serving behind the ingest's pseudonymisation: the model reads what its training data showed,
the world receives real values (tracetune/environments/pseudonymised.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracetune.agent.rollout import (
    RolloutConfig,
    ScriptedPolicy,
    env_factory_from_params,
    run_rollouts,
)
from tracetune.config import EnvironmentParams, PiiParams, Pricing, load_params
from tracetune.environments.base import Call, EpisodeRecord, Task
from tracetune.environments.pseudonymised import PseudonymisedEnvironment, model_env_factory
from tracetune.environments.support_desk import FAMILIES, SupportDesk, oracle_solver
from tracetune.trajectories.pii import Scrubber, has_pseudonym, pii_in

KEY = b"a test key of enough length, never a real one"


def _wrapped() -> PseudonymisedEnvironment:
    return PseudonymisedEnvironment(SupportDesk(), Scrubber(PiiParams(), KEY, remember=True))


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return SupportDesk().tasks(36, seed=5)


def _task(family: str, tasks: list[Task]) -> Task:
    return next(t for t in tasks if t.family == family)


def test_the_model_reads_pseudonyms_and_the_world_gets_the_real_email(tasks: list[Task]) -> None:
    env = _wrapped()
    task = _task("latest_order_by_email", tasks)
    email = task.params["args"][0]
    opening = env.reset(task)
    goal = opening[-1]["content"]
    assert email not in goal and has_pseudonym(goal)
    pseudonym = next(w.rstrip(".") for w in goal.split() if "@" in w)
    # The model copies the pseudonym it read into its call: the tool finds the real customer.
    obs = env.step(Call("find_customer", json.dumps({"email": pseudonym})))
    assert obs.error is None, obs.content
    found = json.loads(obs.content)
    assert found["customer_id"].startswith("C-")
    # The customer's name (PII by key beside customer_id) reaches the model as a pseudonym.
    assert found["name"].startswith("<name:") and pii_in(found) == []


def test_the_verifier_judges_the_restored_answer(tasks: list[Task]) -> None:
    env = _wrapped()
    task = _task("customer_tier", tasks)
    messages = env.reset(task)
    customer = task.params["args"][0]
    obs = env.step(Call("get_customer", {"customer_id": customer}))
    result = json.loads(obs.content)
    # An answer naming the customer by the pseudonym it read is judged on the real name.
    answer = f"{result['name']} is in the {result['tier']} tier."
    record = EpisodeRecord(task, tuple(messages), answer)
    assert env.verify_episode(record).success
    assert result["name"] not in (env.restore(answer) or "")


def test_oracle_through_the_wrapper_scores_100_percent_and_shows_no_pii(tasks: list[Task]) -> None:
    scrubber = Scrubber(PiiParams(), KEY, remember=True)
    results = run_rollouts(
        tasks,
        ScriptedPolicy(oracle_solver),
        lambda: PseudonymisedEnvironment(SupportDesk(), scrubber),
        RolloutConfig(batch_size=6),
        pricing=Pricing(),
        progress=False,
    )
    assert {t.family for t in tasks} == set(FAMILIES)
    failed = [(r.trajectory.task_id, r.outcome.details) for r in results if not r.outcome.success]
    assert failed == []
    for r in results:  # what the model read holds no PII (the oracle writes the real values
        read = [m.model_dump() for m in r.trajectory.messages if m.role != "assistant"]
        assert pii_in(read) == []  # it was built with; a model copies what it read)


def test_served_conversations_equal_the_ingest_scrub_of_raw_ones(tasks: list[Task]) -> None:
    """The point of the wrapper: an episode served through it reads exactly like the same
    episode logged raw and scrubbed at ingest (what SFT trained on)."""
    policy_raw, policy_served = ScriptedPolicy(oracle_solver), ScriptedPolicy(oracle_solver)
    raw = run_rollouts(
        tasks, policy_raw, env_factory_from_params(EnvironmentParams()), progress=False
    )
    served = run_rollouts(
        tasks,
        policy_served,
        lambda: PseudonymisedEnvironment(SupportDesk(), Scrubber(PiiParams(), KEY, remember=True)),
        progress=False,
    )
    ingest = Scrubber(PiiParams(), KEY)
    changed = 0
    for r, s in zip(raw, served, strict=True):
        logged = ingest.scrub_obj([m.model_dump(exclude_none=True) for m in r.trajectory.messages])
        seen = [m.model_dump(exclude_none=True) for m in s.trajectory.messages]
        # The oracle writes the real values it was built with; the model would copy the
        # pseudonyms it read. Compare what the world returned and the user said: every
        # non-assistant message.
        assert [m for m in seen if m["role"] != "assistant"] == [
            m for m in logged if m["role"] != "assistant"
        ], r.trajectory.task_id
        changed += logged != [m.model_dump(exclude_none=True) for m in r.trajectory.messages]
    assert changed > 0  # the comparison covers episodes that held PII


def test_factory_follows_params(tmp_path: Path) -> None:
    params = load_params(Path("params.yaml"))
    (tmp_path / ".tracetune").mkdir()
    (tmp_path / ".tracetune" / "pii.key").write_text("k" * 64 + "\n")
    wrapped = model_env_factory(params, root=tmp_path)()
    assert isinstance(wrapped, PseudonymisedEnvironment)
    for key in ("at_serving", "enabled"):
        pii = params.ingest.pii.model_copy(update={key: False})
        off = params.model_copy(update={"ingest": params.ingest.model_copy(update={"pii": pii})})
        assert not isinstance(model_env_factory(off, root=tmp_path)(), PseudonymisedEnvironment)


def test_a_scrubber_that_forgets_is_refused() -> None:
    with pytest.raises(ValueError, match="remember"):
        PseudonymisedEnvironment(SupportDesk(), Scrubber(PiiParams(), KEY))
