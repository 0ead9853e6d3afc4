"""Moving the aliases: challenger after the gate, champion after a human (or rollback).

Every move follows the same pattern, inside the registry lock:

1. re-read what the move depends on (the version's status and gate tag, the current aliases,
   the champion state) — never trust what was read before the lock was taken;
2. refuse with a `RegistryError` that says why, when the version is not READY, did not pass
   the gate, or (for the champion) fell behind a champion that changed since the gate ran;
3. write: the decision tags on the version, then the alias, then the champion state;
4. verify: read the alias and the state back and compare with what was written (a
   compare-and-set check that catches a broken lock or a hand edit in the UI).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tracetune.config import GateParams
from tracetune.registry.client import (
    APPROVAL_AT,
    APPROVAL_BY,
    APPROVAL_LOG,
    APPROVAL_NOTE,
    APPROVAL_STATUS,
    CHALLENGER,
    CHAMPION,
    EVAL_TAG,
    GATE_CHAMPION,
    GATE_PARAMS,
    GATE_REASONS,
    GATE_VERDICT,
    READY,
    ROLLED_BACK,
    STATE_TAG,
    Registry,
    RegistryError,
    json_tag,
)
from tracetune.registry.history import (
    APPROVE,
    EXPIRE,
    REJECT,
    ROLLBACK,
    ChampionState,
    Event,
    dump_state,
    load_state,
    push,
    reconcile,
    record,
    rollback_target,
    utc_now,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


class NotPromotableError(RegistryError):
    """The version may not become champion (not READY, gate failed, behind the champion)."""


class NoPreviousChampionError(RegistryError):
    """Rollback has nowhere to go."""


class ConcurrentUpdateError(RegistryError):
    """What we wrote was not what we read back: someone changed it outside the lock."""


@dataclass(frozen=True)
class Decision:
    """What an approval, rejection or rollback did, for the CLI and the flow."""

    action: str
    model: str
    version: str
    previous_champion: str | None
    champion: str | None
    by: str
    at: str
    note: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- checks (pure over a ModelVersion) ----------------------------------------------------------


def promotable_problem(mv: ModelVersion) -> str | None:
    """Why this version may not take an alias, or None. Why: a half-registered version (not
    READY) has no files to serve, and one without a passing gate tag was never judged."""
    if mv.status != READY:
        return f"v{mv.version} is {mv.status}, not {READY} (registration unfinished or failed)"
    verdict = (mv.tags or {}).get(GATE_VERDICT)
    if verdict is None:
        return f"v{mv.version} has no gate verdict (tag {GATE_VERDICT}); register it with tracetune"
    if verdict != "passed":
        reasons = json_tag(mv.tags, GATE_REASONS, [])
        failed = [r for r in reasons if str(r).startswith("FAIL")] or reasons
        detail = "; ".join(str(r) for r in failed[:4])
        return f"v{mv.version} did not pass the promotion gate ({detail})"
    return None


def champion_drift_problem(candidate: ModelVersion, champion: ModelVersion | None) -> str | None:
    """Re-run non-inferiority when the champion changed after the candidate's gate ran.

    Why: approval can come days after registration; the gate compared the candidate with the
    champion of that day, and a better champion may have been approved since.
    """
    from tracetune.registry.gate import champion_check, rate_of

    if champion is None or champion.version == candidate.version:
        return None
    if (candidate.tags or {}).get(GATE_CHAMPION) == str(champion.version):
        return None
    cand_eval = json_tag(candidate.tags, EVAL_TAG)
    champ_eval = json_tag(champion.tags, EVAL_TAG)
    gate = json_tag(candidate.tags, GATE_PARAMS)
    if not (cand_eval and champ_eval and gate):
        return None  # nothing stored to compare with (a champion registered by hand)
    check = champion_check(
        rate_of(cand_eval, "candidate"),
        rate_of(champ_eval, "champion"),
        str(champion.version),
        GateParams.model_validate({k: v for k, v in gate.items() if k in GateParams.model_fields}),
    )
    if check.passed:
        return None
    return (
        f"the champion changed since v{candidate.version} was gated (now v{champion.version}) "
        f"and it is no longer non-inferior: {check.reason}"
    )


def rollback_problem(mv: ModelVersion | None) -> str | None:
    """Why a former champion cannot be champion again."""
    if mv is None:
        return "deleted"
    problem = promotable_problem(mv)
    if problem:
        return problem
    if (mv.tags or {}).get(APPROVAL_STATUS) == "rejected":
        return f"v{mv.version} was rejected after its approval"
    return None


# --- writes -------------------------------------------------------------------------------------


def _decision_tags(mv: ModelVersion, status: str, by: str, at: str, note: str) -> dict[str, str]:
    """The latest decision as flat tags plus the full log of decisions on this version."""
    log = json_tag(mv.tags or {}, APPROVAL_LOG, [])
    log.append({"status": status, "by": by, "at": at, "note": note})
    return {
        APPROVAL_STATUS: status,
        APPROVAL_BY: by,
        APPROVAL_AT: at,
        APPROVAL_NOTE: note,
        APPROVAL_LOG: json.dumps(log[-50:]),
    }


def _set_version_tags(registry: Registry, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.name, version, key, value)


def _write_state(registry: Registry, state: ChampionState) -> str:
    text = dump_state(state)
    registry.client.set_registered_model_tag(registry.name, STATE_TAG, text)
    return text


def _verify(registry: Registry, alias: str | None, version: str | None, state_text: str) -> None:
    """Compare-and-set check: the alias and the state must read back as written."""
    model = registry.model()
    if alias is not None:
        actual = (model.aliases or {}).get(alias)
        if str(actual) != str(version):
            raise ConcurrentUpdateError(
                f"{registry.name}@{alias} reads v{actual} right after we set v{version}: "
                "someone moved it outside tracetune's lock; check `tracetune registry status`"
            )
    if model.tags.get(STATE_TAG) != state_text:
        raise ConcurrentUpdateError(
            f"{registry.name}: the champion history changed under us; re-run the command"
        )


def _version_or_none(registry: Registry, version: str | None) -> ModelVersion | None:
    if version is None:
        return None
    try:
        return registry.version(version)
    except RegistryError:
        return None


def _snapshot(registry: Registry) -> tuple[dict[str, str], ChampionState]:
    """Aliases and champion state from one read of the registered model (one request)."""
    model = registry.model()
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    return aliases, load_state(model.tags.get(STATE_TAG))


def set_challenger(registry: Registry, version: str) -> bool:
    """Point `challenger` at a READY, gate-passed version (never at a half-registered one).

    The alias only moves forward: when two registrations race, a newer version that already
    holds it keeps it. Returns whether the alias now points at `version`.
    """
    with registry.lock():
        mv = registry.version(version)
        problem = promotable_problem(mv)
        if problem:
            raise NotPromotableError(f"not setting {CHALLENGER}: {problem}")
        version = str(mv.version)
        current = registry.alias(CHALLENGER)
        if current is not None and int(current) > int(version):
            holder = _version_or_none(registry, current)
            if holder is not None and promotable_problem(holder) is None:
                return False
        registry.client.set_registered_model_alias(registry.name, CHALLENGER, version)
        actual = registry.alias(CHALLENGER)
        if actual != version:
            raise ConcurrentUpdateError(
                f"{registry.name}@{CHALLENGER} reads v{actual} right after we set v{version}"
            )
    return True


def approve(registry: Registry, version: str, by: str, note: str = "") -> Decision:
    """Make `version` the champion after a human approved it (module docstring)."""
    if not by.strip():
        raise RegistryError("an approval needs the approver's name (--by)")
    with registry.lock():
        mv = registry.version(version)
        problem = promotable_problem(mv)
        if problem:
            raise NotPromotableError(f"cannot approve {registry.name} v{mv.version}: {problem}")
        aliases, recorded = _snapshot(registry)
        current = aliases.get(CHAMPION)
        drift = champion_drift_problem(mv, _version_or_none(registry, current))
        if drift:
            raise NotPromotableError(f"cannot approve {registry.name} v{mv.version}: {drift}")
        at = utc_now()
        version = str(mv.version)
        _set_version_tags(registry, version, _decision_tags(mv, "approved", by, at, note))
        state = reconcile(recorded, current, at)
        if current == version:
            event = Event(APPROVE, version, current, by, at, note or "already champion")
            text = _write_state(registry, record(state, event))
            _verify(registry, CHAMPION, version, text)
            message = f"{registry.name} v{version} is already {CHAMPION}; approval recorded"
            return Decision(
                APPROVE, registry.name, version, current, version, by, at, note, message
            )
        registry.client.set_registered_model_alias(registry.name, CHAMPION, version)
        if aliases.get(CHALLENGER) == version:
            registry.client.delete_registered_model_alias(registry.name, CHALLENGER)
        text = _write_state(registry, push(state, Event(APPROVE, version, current, by, at, note)))
        _verify(registry, CHAMPION, version, text)
    before = f"v{current}" if current else "none"
    message = f"{registry.name}: {CHAMPION} v{version} (was {before}), approved by {by}"
    return Decision(APPROVE, registry.name, version, current, version, by, at, note, message)


def _record_refusal(
    registry: Registry, version: str, status: str, action: str, by: str, note: str
) -> Decision:
    """Reject / expire: tags on the version, an event in the history; the champion stays."""
    with registry.lock():
        mv = registry.version(version)
        version = str(mv.version)
        at = utc_now()
        _set_version_tags(registry, version, _decision_tags(mv, status, by, at, note))
        aliases, recorded = _snapshot(registry)
        current = aliases.get(CHAMPION)
        if aliases.get(CHALLENGER) == version:
            registry.client.delete_registered_model_alias(registry.name, CHALLENGER)
        state = reconcile(recorded, current, at)
        text = _write_state(registry, record(state, Event(action, version, current, by, at, note)))
        _verify(registry, None, None, text)
    message = f"{registry.name} v{version} {status} by {by}"
    if current == version:
        message += (
            f"; it is still {CHAMPION}: run `tracetune rollback {registry.name}` to demote it"
        )
    return Decision(action, registry.name, version, current, current, by, at, note, message)


def reject(registry: Registry, version: str, by: str, note: str = "") -> Decision:
    """Record a rejection; a rejected challenger loses the `challenger` alias."""
    if not by.strip():
        raise RegistryError("a rejection needs the reviewer's name (--by)")
    return _record_refusal(registry, version, "rejected", REJECT, by, note)


def expire(registry: Registry, version: str, note: str = "") -> Decision:
    """Record that nobody decided within the approval timeout (the Prefect flow)."""
    return _record_refusal(registry, version, "expired", EXPIRE, "approval-timeout", note)


def rollback(registry: Registry, by: str, note: str = "") -> Decision:
    """Move `champion` back to the previous approved version (history.py's stack)."""
    if not by.strip():
        raise RegistryError("a rollback needs the operator's name (--by)")
    with registry.lock():
        aliases, recorded = _snapshot(registry)
        current = aliases.get(CHAMPION)
        if current is None:
            raise NoPreviousChampionError(f"{registry.name} has no {CHAMPION} to roll back")
        at = utc_now()
        state = reconcile(recorded, current, at)
        target, skipped, popped = rollback_target(
            state, current, lambda v: rollback_problem(_version_or_none(registry, v))
        )
        if target is None:
            raise NoPreviousChampionError(
                f"{registry.name} v{current} is the only approved {CHAMPION} on record"
                + (f" (skipped unusable v{', v'.join(skipped)})" if skipped else "")
            )
        registry.client.set_registered_model_alias(registry.name, CHAMPION, target)
        registry.client.set_model_version_tag(registry.name, current, ROLLED_BACK, f"{at} by {by}")
        event = Event(ROLLBACK, target, current, by, at, note, skipped)
        text = _write_state(registry, record(popped, event))
        _verify(registry, CHAMPION, target, text)
    message = f"{registry.name}: {CHAMPION} v{target} (rolled back from v{current}) by {by}"
    if skipped:
        message += f"; skipped unusable v{', v'.join(skipped)}"
    return Decision(ROLLBACK, registry.name, target, current, target, by, at, note, message)


# --- reading ------------------------------------------------------------------------------------


def registry_status(registry: Registry, limit: int = 20) -> dict[str, Any]:
    """Aliases, the latest versions with their verdicts and decisions, and the history."""
    model = registry.model()
    state = load_state(model.tags.get(STATE_TAG))
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    versions = registry.client.search_model_versions(
        f"name = '{registry.name}'", max_results=limit, order_by=["version_number DESC"]
    )
    rows = []
    for mv in versions:
        tags = mv.tags or {}
        cand = json_tag(tags, EVAL_TAG, {}) or {}
        rows.append(
            {
                "version": str(mv.version),
                "status": mv.status,
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "candidate": tags.get("tracetune.candidate"),
                "tsr": cand.get("tsr"),
                "tsr_ci": [cand.get("tsr_ci_low"), cand.get("tsr_ci_high")],
                "gate": tags.get(GATE_VERDICT, "?"),
                "failed": tags.get("tracetune.gate.failed", ""),
                "approval": tags.get(APPROVAL_STATUS, ""),
                "by": tags.get(APPROVAL_BY, ""),
                "rolled_back": tags.get(ROLLED_BACK, ""),
            }
        )
    problems = []
    if aliases.get(CHAMPION) and state.top not in (None, aliases[CHAMPION]):
        problems.append(
            f"{CHAMPION} alias v{aliases[CHAMPION]} differs from the recorded v{state.top} "
            "(set outside tracetune?); the next approve/rollback adopts the alias"
        )
    return {
        "model": registry.name,
        "aliases": aliases,
        "versions": rows,
        "champion_stack": list(state.stack),
        "history": [e.as_dict() for e in state.history],
        "problems": problems,
    }
