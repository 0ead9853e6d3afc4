"""Tool environments: tasks whose outcomes are verified by really executing tools."""

from tracetune.environments.base import (
    Call,
    Environment,
    EpisodeRecord,
    FixedTaskEnvironment,
    Observation,
    Outcome,
    Solver,
    Task,
    Tool,
    ToolError,
    load_environment,
)

__all__ = [
    "Call",
    "Environment",
    "EpisodeRecord",
    "FixedTaskEnvironment",
    "Observation",
    "Outcome",
    "Solver",
    "Task",
    "Tool",
    "ToolError",
    "load_environment",
]
