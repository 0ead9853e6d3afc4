"""A third-party tool environment, loaded by dotted path with no change to tracetune's code.

Use it with, in params.yaml:

    environment:
      class_path: unit_converter_env.UnitConverter   # module on PYTHONPATH . class
      kwargs: {seed_offset: 0}

See docs/environments.md for the interface this implements.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tracetune.environments import Environment, Outcome, Task, Tool, ToolError

FACTORS = {("km", "mi"): 0.621371, ("kg", "lb"): 2.204623, ("l", "gal"): 0.264172}


class UnitConverter(Environment):
    """One tool (`convert`), one task family: convert a quantity, answer with the number."""

    name = "unit_converter"
    system_prompt = "You convert units with the convert tool. Answer with the number, 2 decimals."

    def __init__(self, max_steps: int = 5, seed_offset: int = 0) -> None:
        self.seed_offset = seed_offset
        super().__init__(max_steps=max_steps)

    def _tools(self) -> Sequence[Tool]:
        params = {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"type": "string"},
                "to_unit": {"type": "string"},
            },
            "required": ["value", "from_unit", "to_unit"],
            "additionalProperties": False,
        }
        return [Tool("convert", "Convert a value between units.", params, self.convert)]

    def convert(self, value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
        factor = FACTORS.get((from_unit, to_unit))
        if factor is None:
            raise ToolError(f"cannot convert {from_unit} to {to_unit}")  # shown to the agent
        return {"value": round(value * factor, 2), "unit": to_unit}

    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        if families and set(families) != {"convert"}:
            raise ValueError(f"unknown task families: {sorted(set(families) - {'convert'})}")
        rng = random.Random(seed + self.seed_offset)
        out = []
        for i in range(n):
            (a, b), _ = rng.choice(sorted(FACTORS.items()))
            out.append(self._task(rng.randint(1, 500), a, b, i))
        return out

    def task_by_id(self, task_id: str) -> Task:
        """Rebuilt from the id itself (`convert:value:from:to:i`), whatever seed drew it."""
        try:
            _, value, a, b, i = task_id.split(":")
            if (a, b) not in FACTORS:
                raise ValueError(f"no conversion {a} -> {b}")
            return self._task(int(value), a, b, int(i))
        except ValueError as exc:
            raise KeyError(f"task {task_id!r} not found in {self.name}: {exc}") from None

    def _task(self, value: int, a: str, b: str, i: int) -> Task:
        return Task(
            id=f"convert:{value}:{a}:{b}:{i}",
            family="convert",
            goal=f"How many {b} is {value} {a}?",
            check={"number": round(value * FACTORS[(a, b)], 2)},
            params={"value": value, "from_unit": a, "to_unit": b},
        )

    def _reset(self, task: Task) -> None:
        """Stateless world: nothing to restore."""

    def verify(self, final_answer: str | None) -> Outcome:
        assert self.task is not None
        want = self.task.check["number"]
        ok = final_answer is not None and f"{want:.2f}" in final_answer
        return Outcome(success=ok, reward=1.0 if ok else -1.0, details={"expected": want})
