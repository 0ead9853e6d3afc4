"""Tool environments: tasks whose outcomes are verified by really executing tools."""

from tracetune.environments.base import (
    Call,
    Environment,
    Observation,
    Outcome,
    Task,
    Tool,
    ToolError,
    load_environment,
)

__all__ = [
    "Call",
    "Environment",
    "Observation",
    "Outcome",
    "Task",
    "Tool",
    "ToolError",
    "load_environment",
]
