"""Train / held-out split by task, and the readers later stages use.

A task is held out when a seeded hash of its id falls below `split.heldout_fraction`, or when its
family is held out whole. That rule needs no state: the same task lands on the same side in every
run and every batch, so the held-out set stays held out as data grows and versions accumulate, and
no task can be on both sides. The held-out set is the evaluation set of every later stage:
`heldout.jsonl` (its golden trajectories) and `heldout_tasks.json` (its task ids and families,
from which evaluation rebuilds the tasks in the environment: `load_heldout_tasks`).

Task ids were PII-scrubbed at ingest (`latest_order_by_email:<email>` carries an email). Such ids
hold a pseudonym; `load_heldout_tasks` resolves them through the environment's `task_by_id`
with the same keyed pseudonym function, so no real value is ever stored here.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tracetune.config import PiiParams, SplitParams
from tracetune.environments.base import HELDOUT_SPLIT, TRAIN_SPLIT, Environment, Task
from tracetune.trajectories.io import iter_lines, read_trajectories
from tracetune.trajectories.pii import Scrubber, has_pseudonym
from tracetune.trajectories.schema import Trajectory

TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
HELDOUT_TASKS_FILE = "heldout_tasks.json"
CHARS_PER_TOKEN = 4  # no tokenizer exists at this stage; SFT measures real lengths
TOKEN_BIN = 64
TOKEN_BINS = 48  # 0..3071 tokens, then one overflow bin


def heldout_score(task_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, task id)."""
    digest = hashlib.blake2b(f"{seed}:{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_heldout(
    task_id: str,
    family: str,
    params: SplitParams,
    declared: Mapping[str, str] | None = None,
) -> bool:
    """Held out or not. `declared` (task id -> split, `declared_splits(env)`) is the
    environment's own split: a `test` task is always held out, a `train` task only when its
    family is held out whole (`split.heldout_families`, an explicit choice); ids it does not
    name (or every id, without a declared split) go by the seeded hash."""
    side = declared.get(task_id) if declared else None
    if side == HELDOUT_SPLIT or family in params.heldout_families:
        return True
    if side == TRAIN_SPLIT:
        return False
    return heldout_score(task_id, params.seed) < params.heldout_fraction


def approx_tokens(record: dict[str, Any]) -> int:
    """Rough conversation length in tokens (characters / 4) for the length histogram."""
    chars = 0
    for message in record.get("messages") or ():
        chars += len(message.get("content") or "")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            chars += len(function.get("name") or "") + len(function.get("arguments") or "")
    return chars // CHARS_PER_TOKEN


@dataclass
class SplitReport:
    train: int = 0
    heldout: int = 0
    heldout_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    families: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    token_hist: dict[str, list[int]] = field(
        default_factory=lambda: {"train": [0] * (TOKEN_BINS + 1), "heldout": [0] * (TOKEN_BINS + 1)}
    )
    token_max: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "heldout": self.heldout,
            "heldout_tasks": len(self.heldout_tasks),
            "families": {f: dict(c) for f, c in sorted(self.families.items())},
        }


def split_curated(
    lines: Iterable[str],
    out_dir: Path,
    params: SplitParams,
    declared: Mapping[str, str] | None = None,
    logged: Iterable[tuple[str, str]] = (),
    test_tasks: Iterable[tuple[str, str]] = (),
) -> SplitReport:
    """Write train.jsonl, heldout.jsonl and heldout_tasks.json from curated trajectory lines.

    `declared`: the environment's own split (`declared_splits(env)`), honoured by `is_heldout`;
    `test_tasks` (its `test` split: `declared_test_tasks`) are evaluation tasks, logged or
    not. `logged`: (task id, family) of every ingested episode, whatever its outcome. The
    evaluation set is every held-out task the logs or the declared split name, not only those
    that kept a golden episode through curation: a set chosen by production's successes
    would flatter production on it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SplitReport()
    with (
        (out_dir / TRAIN_FILE).open("w", encoding="utf-8") as train,
        (out_dir / HELDOUT_FILE).open("w", encoding="utf-8") as heldout,
    ):
        for line in lines:
            record = orjson.loads(line)
            task_id, family = str(record["task_id"]), str(record["family"])
            side = "heldout" if is_heldout(task_id, family, params, declared) else "train"
            (heldout if side == "heldout" else train).write(line + "\n")
            setattr(report, side, getattr(report, side) + 1)
            report.families[family][side] += 1
            tokens = approx_tokens(record)
            report.token_max = max(report.token_max, tokens)
            report.token_hist[side][min(tokens // TOKEN_BIN, TOKEN_BINS)] += 1
            if side == "heldout":
                _heldout_entry(report, task_id, family)["trajectories"] += 1
    for task_id, family in logged:
        if is_heldout(task_id, family, params, declared):
            _heldout_entry(report, task_id, family)["logged"] += 1
    for task_id, family in test_tasks:
        _heldout_entry(report, task_id, family)
    write_heldout_tasks(out_dir / HELDOUT_TASKS_FILE, report, params)
    return report


def _heldout_entry(report: SplitReport, task_id: str, family: str) -> dict[str, Any]:
    """The task's entry in heldout_tasks.json: golden `trajectories` kept, episodes `logged`."""
    return report.heldout_tasks.setdefault(
        task_id, {"task_id": task_id, "family": family, "trajectories": 0, "logged": 0}
    )


def declared_test_tasks(env: Environment) -> list[tuple[str, str]]:
    """(task id, family) of the environment's declared `test` split, in its order."""
    declared = env.splits() or {}
    return [(i, env.task_by_id(i).family) for i in declared.get(HELDOUT_SPLIT, ())]


def logged_tasks(ingested: Path) -> Iterator[tuple[str, str]]:
    """(task id, family) of every ingested episode (PII-scrubbed ids, as curation saw them)."""
    if not Path(ingested).exists():
        return
    for line in iter_lines(Path(ingested)):
        record = orjson.loads(line)
        yield str(record["task_id"]), str(record["family"])


def write_heldout_tasks(path: Path, report: SplitReport, params: SplitParams) -> None:
    tasks = sorted(report.heldout_tasks.values(), key=lambda t: (t["family"], t["task_id"]))
    payload = {
        "rule": params.model_dump(mode="json"),
        "count": len(tasks),
        "families": dict(sorted(Counter(t["family"] for t in tasks).items())),
        "tasks": [t | {"pseudonymised": has_pseudonym(t["task_id"])} for t in tasks],
    }
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# What later stages read.
# ---------------------------------------------------------------------------------------------
def load_train(curated_dir: Path | str) -> Iterator[Trajectory]:
    """The training trajectories (golden, deduplicated, PII-scrubbed), streamed."""
    return read_trajectories(Path(curated_dir) / TRAIN_FILE)


def load_heldout(curated_dir: Path | str) -> Iterator[Trajectory]:
    """The held-out trajectories: golden references for the evaluation tasks."""
    return read_trajectories(Path(curated_dir) / HELDOUT_FILE)


def read_heldout_tasks(curated_dir: Path | str) -> dict[str, Any]:
    """`heldout_tasks.json`: the rule, and every held-out task id with its family."""
    return json.loads((Path(curated_dir) / HELDOUT_TASKS_FILE).read_text())


@dataclass
class HeldoutTasks:
    tasks: list[Task]
    unresolved: list[str]  # ids the environment could not rebuild: reported, never dropped


def load_heldout_tasks(
    env: Environment, curated_dir: Path | str, pii: PiiParams | None = None, max_draws: int = 20_000
) -> HeldoutTasks:
    """Rebuild the held-out tasks in `env`: the evaluation set of every later stage.

    Plain ids go through `env.task_by_id`. Ids that hold a pseudonym (the PII scrub at ingest
    replaced an email inside them) cannot be read back; they are found by drawing the family's
    tasks from the environment and pseudonymising each id with the same key as ingest
    (`ingest.pii.key_env`) until it matches. Order follows `heldout_tasks.json`.
    """
    entries = read_heldout_tasks(curated_dir)["tasks"]
    scrubber = Scrubber(pii or PiiParams())
    hidden = {e["task_id"]: e["family"] for e in entries if has_pseudonym(e["task_id"])}
    found = _find_pseudonymised(env, hidden, scrubber, max_draws)
    tasks, unresolved = [], []
    for entry in entries:
        task_id = entry["task_id"]
        try:
            tasks.append(found[task_id] if task_id in hidden else env.task_by_id(task_id))
        except KeyError:
            unresolved.append(task_id)
    return HeldoutTasks(tasks, unresolved)


def _find_pseudonymised(
    env: Environment, wanted: dict[str, str], scrubber: Scrubber, max_draws: int
) -> dict[str, Task]:
    found: dict[str, Task] = {}
    for family in sorted(set(wanted.values())):
        ids = {t for t, f in wanted.items() if f == family}
        n, seed, drawn = 64, 0, 0
        while ids - found.keys() and drawn < max_draws:
            try:
                drawn_tasks = env.tasks(n, seed=seed, families=[family])
            except ValueError:  # fewer than n instances exist
                if n == 1:
                    break
                n //= 2
                continue
            for task in drawn_tasks:
                key = scrubber.scrub_text(task.id)
                if key in ids:
                    found[key] = task
            seed += 1
            drawn += n
    return found
