"""Copy probes' scoring (`probe_scores`): what counts as copying an unseen id.

Replies are written as the default base writes them (the shapes quoted in docs/training.md):
digits copied with letters redrawn, an id of its own, an exact copy, a malformed call.
"""

from __future__ import annotations

import json

from tracetune.agent.base_model import Probe, make_probes, probe_scores


def _call(name: str, arguments: dict[str, str]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _probe() -> Probe:
    return next(p for p in make_probes(3, seed=0) if p.arguments == {"glacier_id": "YM37920"})


def test_digits_copied_with_the_letters_redrawn_count_as_digits_not_as_a_copy() -> None:
    probe = _probe()
    scores = probe_scores(probe, _call("view_glacier", {"glacier_id": "WC37920"}))
    assert scores == {"copied": False, "digits": True, "exact": False}


def test_an_id_of_its_own_copies_nothing() -> None:
    probe = _probe()
    assert probe_scores(probe, _call("view_glacier", {"glacier_id": "L-3338"}))["digits"] is False
    # the wanted digits split across a hyphen still count: the digit strings are compared
    split = _call("view_glacier", {"glacier_id": "GC-379-20"})
    assert probe_scores(probe, split)["digits"] is True


def test_an_exact_copy_scores_everything_and_a_malformed_call_nothing() -> None:
    probe = _probe()
    exact = probe_scores(probe, _call("view_glacier", {"glacier_id": "YM37920"}))
    assert exact == {"copied": True, "digits": True, "exact": True}
    broken = probe_scores(probe, '<tool_call>\n{"name": "view_glacier", "arguments": {"glac')
    assert broken == {"copied": False, "digits": False, "exact": False}
