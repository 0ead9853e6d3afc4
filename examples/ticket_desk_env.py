"""A third-party environment with a fixed task list: what a benchmark adapter looks like.

Use it with, in params.yaml:

    environment:
      class_path: ticket_desk_env.TicketDesk   # module on PYTHONPATH . class

It shows every optional part of the contract (docs/environments.md): a fixed list of tasks
(`FixedTaskEnvironment.all_tasks`) with the benchmark's own train/test split (`splits`), a
reference solver (`oracle`), a hand-off tool that ends the episode (`Tool(terminates=True)`),
tools that return plain strings (passed to the agent verbatim) and a verifier that reads the
whole episode (`verify_episode`): a status is only right if a lookup in this episode showed it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from tracetune.environments import (
    Call,
    EpisodeRecord,
    FixedTaskEnvironment,
    Outcome,
    Solver,
    Task,
    Tool,
    ToolError,
)

PRIORITIES = ("low", "normal", "high", "urgent")
STATUSES = ("open", "waiting", "solved")
TICKETS: dict[str, dict[str, str]] = {
    "T-101": {"status": "open", "priority": "low", "summary": "Printer on floor 2 jams"},
    "T-102": {"status": "waiting", "priority": "normal", "summary": "VPN drops every hour"},
    "T-103": {"status": "solved", "priority": "high", "summary": "Payroll export fails"},
    "T-104": {"status": "open", "priority": "normal", "summary": "New laptop for Dana"},
    "T-105": {"status": "waiting", "priority": "low", "summary": "Badge does not open door B"},
    "T-106": {"status": "open", "priority": "urgent", "summary": "Mail server out of disk"},
}
# The whole benchmark, in a stable order: (task id, goal, ticket[, priority]) per family.
LOOKUPS = (
    ("lookup-101", "What is the status of ticket T-101?", "T-101"),
    ("lookup-102", "Is ticket T-102 still open? Tell me its status.", "T-102"),
    ("lookup-103", "What status does ticket T-103 have?", "T-103"),
    ("lookup-105", "Please check the status of ticket T-105.", "T-105"),
)
PRIORITY_CHANGES = (
    ("raise-101", "Set ticket T-101 to high priority.", "T-101", "high"),
    ("raise-104", "Ticket T-104 is urgent now, update it.", "T-104", "urgent"),
    ("lower-106", "Lower ticket T-106 to normal priority.", "T-106", "normal"),
    ("lower-102", "Ticket T-102 can wait: make it low priority.", "T-102", "low"),
    ("keep-103", "Ticket T-103 keeps its high priority: leave it.", "T-103", "high"),
)
HANDOFFS = (
    ("human-103", "I want a human to look at ticket T-103.", "T-103"),
    ("human-105", "Get me a person about ticket T-105, not a bot.", "T-105"),
    ("human-106", "Escalate ticket T-106 to a human now.", "T-106"),
    ("human-104", "Can a human agent take over ticket T-104?", "T-104"),
)
TRAIN = ("lookup-101", "lookup-102", "lookup-103", "raise-101", "raise-104", "lower-106",
         "human-103", "human-105")  # fmt: skip
# `keep-103` is solved by doing nothing: the do-nothing floor of evaluation scores it.
TEST = ("lookup-105", "lower-102", "keep-103", "human-106", "human-104")


def _schema(**props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


class TicketDesk(FixedTaskEnvironment):
    """An IT help desk: look tickets up, change their priority, hand them to a human."""

    name = "ticket_desk"
    system_prompt = (
        "You are an IT help-desk assistant. Use the tools to read and update tickets. When the "
        "user asks for a person, hand the ticket off. Answer in one short sentence."
    )

    def __init__(self, max_steps: int = 6) -> None:
        self.tickets: dict[str, dict[str, str]] = {}
        self.handed_off: dict[str, str] = {}
        super().__init__(max_steps=max_steps)

    # --- tools --------------------------------------------------------------------------
    def _tools(self) -> Sequence[Tool]:
        ticket = {"type": "string", "pattern": r"^T-\d{3}$"}
        return [
            Tool(
                "get_ticket",
                "Read a ticket: status, priority and summary.",
                _schema(ticket_id=ticket),
                self.get_ticket,
                read_only=True,
            ),
            Tool(
                "set_priority",
                "Change a ticket's priority.",
                _schema(ticket_id=ticket, priority={"type": "string", "enum": list(PRIORITIES)}),
                self.set_priority,
            ),
            Tool(
                "hand_off",
                "Hand the ticket to a human agent; this ends the conversation.",
                _schema(ticket_id=ticket, reason={"type": "string", "maxLength": 200}),
                self.hand_off,
                terminates=True,
            ),
        ]

    def _ticket(self, ticket_id: str) -> dict[str, str]:
        if ticket_id not in self.tickets:
            raise ToolError(f"ticket {ticket_id} not found")
        return self.tickets[ticket_id]

    def get_ticket(self, ticket_id: str) -> str:
        t = self._ticket(ticket_id)
        return f"{ticket_id} | status: {t['status']} | priority: {t['priority']} | {t['summary']}"

    def set_priority(self, ticket_id: str, priority: str) -> str:
        self._ticket(ticket_id)["priority"] = priority
        return f"{ticket_id} priority is now {priority}"

    def hand_off(self, ticket_id: str, reason: str) -> str:
        self._ticket(ticket_id)
        self.handed_off[ticket_id] = reason
        return f"{ticket_id} handed to a human agent"

    # --- tasks --------------------------------------------------------------------------
    def all_tasks(self) -> Sequence[Task]:
        return [
            *(Task(i, "lookup", goal, {"ticket": t}) for i, goal, t in LOOKUPS),
            *(Task(i, "priority", goal, {"set": [t, p]}) for i, goal, t, p in PRIORITY_CHANGES),
            *(Task(i, "handoff", goal, {"handoff": t}) for i, goal, t in HANDOFFS),
        ]

    def splits(self) -> Mapping[str, Sequence[str]]:
        return {"train": TRAIN, "test": TEST}

    def _reset(self, task: Task) -> None:
        self.tickets = copy.deepcopy(TICKETS)
        self.handed_off = {}

    # --- verdicts -----------------------------------------------------------------------
    def verify(self, final_answer: str | None) -> Outcome:
        """An answer alone (no episode): judged as an episode that made no call."""
        assert self.task is not None
        return self.verify_episode(EpisodeRecord(self.task, (), final_answer))

    def verify_episode(self, episode: EpisodeRecord) -> Outcome:
        check = episode.task.check
        reasons: list[str] = []
        changed = {k for k, t in self.tickets.items() if t["priority"] != TICKETS[k]["priority"]}
        if "ticket" in check:  # a status, as a lookup in this very episode returned it
            ticket = check["ticket"]
            status = TICKETS[ticket]["status"]
            shown = any(
                call.name == "get_ticket" and result and f"status: {status}" in result
                for call, result in episode.calls()
            )
            answer = (episode.final_answer or "").lower()
            if not shown:
                reasons.append(f"no lookup of {ticket} in the episode")
            if status not in answer or any(s in answer for s in STATUSES if s != status):
                reasons.append(f"answer does not state '{status}' alone")
        if "set" in check:
            ticket, priority = check["set"]
            if self.tickets[ticket]["priority"] != priority:
                reasons.append(f"{ticket} should be {priority}")
            changed.discard(ticket)
        if "handoff" in check:
            if check["handoff"] not in self.handed_off or episode.ended_by != "terminated":
                reasons.append(f"{check['handoff']} was not handed off")
        elif self.handed_off:
            reasons.append(f"handed off {sorted(self.handed_off)} without being asked")
        if changed:
            reasons.append(f"unexpected priority change on {sorted(changed)}")
        ok = not reasons
        return Outcome(ok, 1.0 if ok else -1.0, {"reasons": reasons})

    # --- the reference solver -----------------------------------------------------------
    def oracle(self, task: Task) -> Solver:
        return _solve(task)


def _solve(task: Task) -> Solver:
    check = task.check
    if "ticket" in check:
        result = yield Call("get_ticket", {"ticket_id": check["ticket"]})
        status = str(result["result"]).split("status: ")[1].split(" |")[0]
        return f"Ticket {check['ticket']} is {status}."
    if "set" in check:
        ticket, priority = check["set"]
        yield Call("set_priority", {"ticket_id": ticket, "priority": priority})
        return f"Ticket {ticket} now has {priority} priority."
    yield Call("hand_off", {"ticket_id": check["handoff"], "reason": task.goal[:200]})
    return ""  # never reached: the hand-off ends the episode
