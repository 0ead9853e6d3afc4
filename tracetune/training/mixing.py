"""Family-balanced data mix: each epoch re-draws the train set with flattened family shares.

Why: production logs hold the task families in the proportions users ask them, and golden
curation keeps the easy ones more often (on the embedded default: 704 `missing_order`
trajectories, 99 `customer_spend`, 49 `product_price`), while evaluation weighs every family
about the same. Trained on the logged mix, a small model spends most of its steps on what it
already does and sees the hard multi-step families a few dozen times. The standard remedy of
multilingual and multi-task training is temperature sampling: family f's share of an epoch is
proportional to n_f ** alpha (alpha 1: as logged; 0: every family equal; 0.5: between). An
epoch keeps the train set's size, so the compute per epoch is unchanged; rare families are
repeated and frequent ones sub-sampled, with a fresh draw per epoch so no example is dropped
for the whole run.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any


def family_of(trajectory: Mapping[str, Any]) -> str:
    """The trajectory's task family (`family`, else the `task_id` prefix)."""
    family = trajectory.get("family")
    if family:
        return str(family)
    return str(trajectory.get("task_id", "")).split(":", 1)[0]


def family_targets(counts: Mapping[str, int], alpha: float, total: int) -> dict[str, int]:
    """Examples per family in one epoch of `total`: shares proportional to n ** alpha.

    Largest-remainder rounding, so the targets sum to `total` exactly; ties go to the family
    that comes first by name (deterministic across runs and machines).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"family alpha must be in [0, 1], got {alpha}")
    present = {f: n for f, n in counts.items() if n > 0}
    if not present:
        return {}
    weights = {f: n**alpha for f, n in present.items()}
    norm = sum(weights.values())
    exact = {f: total * w / norm for f, w in weights.items()}
    out = {f: int(x) for f, x in exact.items()}
    short = total - sum(out.values())
    by_remainder = sorted(exact, key=lambda f: (-(exact[f] - out[f]), f))
    for f in by_remainder[:short]:
        out[f] += 1
    return out


def mixed_epoch(
    trajectories: Sequence[dict[str, Any]], alpha: float, seed: int, epoch: int
) -> list[dict[str, Any]]:
    """One epoch of the re-weighted mix: whole copies of each family, then a seeded sample.

    A family with target k and n examples contributes k // n full copies plus k % n examples
    drawn without replacement (seeded by seed, family and epoch: a resumed run rebuilds the same
    data). alpha 1 returns the trajectories unchanged.
    """
    if alpha == 1:
        return list(trajectories)
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for traj in trajectories:
        by_family[family_of(traj)].append(traj)
    counts = Counter({f: len(v) for f, v in by_family.items()})
    targets = family_targets(counts, alpha, len(trajectories))
    out: list[dict[str, Any]] = []
    for family in sorted(by_family):
        members, k = by_family[family], targets[family]
        copies, rest = divmod(k, len(members))
        out.extend(members * copies)
        rng = random.Random(f"{seed}:{family}:{epoch}")
        out.extend(rng.sample(members, rest))
    return out
