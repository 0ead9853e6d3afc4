"""Our own layout (the simulator's and any team's logs in `Trajectory` form), mapping applied.

This is the hot path of the 100k-line benchmark: one dict check, the mapping, nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tracetune.config import FieldMapping
from tracetune.trajectories import quarantine as q
from tracetune.trajectories.mapping import apply_mapping
from tracetune.trajectories.readers.base import Reader, ReadError

# Fields only our layout carries together: enough to tell it from a bare chat log.
SIGNATURE = frozenset({"trajectory_id", "task_id", "messages", "success"})


class TracetuneReader(Reader):
    name: ClassVar[str] = "tracetune"

    def recognises(self, value: Any) -> bool:
        return isinstance(value, dict) and value.keys() >= SIGNATURE

    def to_record(self, item: Any, mapping: FieldMapping) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise ReadError(q.NOT_AN_OBJECT, f"a JSON {type(item).__name__}, not an object")
        return apply_mapping(item, mapping)
