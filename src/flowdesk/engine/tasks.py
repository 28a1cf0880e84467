"""What a workflow says when it hands work to a person: who may do it (`Assignees`), what
happens when nobody does (`Escalation`), and who hears about it (`Notifier`).

``await ctx.human_task(...)`` creates the task durably and suspends the run; completing the
task (API, CLI, web inbox) wakes the run on any worker with the validated form.
Escalations are durable timers: the task row holds when its next escalation is due, and any
worker fires it once (`Worker` upkeep), even after every process was restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from flowdesk import errors
from flowdesk.store.people import Escalated

__all__ = ["Assignees", "Escalated", "Escalation", "LogNotifier", "Notifier"]

log = logging.getLogger("flowdesk.tasks")


@dataclass(frozen=True, slots=True)
class Assignees:
    """Who may act on a task: any of these users, members of these groups, holders of
    these roles. ``strategy="claim"`` offers the task to all of them until one claims it;
    ``"workload"`` assigns it at once to the candidate user with the fewest open tasks."""

    users: Sequence[str] = ()
    groups: Sequence[str] = ()
    roles: Sequence[str] = ()
    strategy: Literal["claim", "workload"] = "claim"

    def __post_init__(self) -> None:
        if self.strategy not in ("claim", "workload"):
            raise errors.ConfigurationError(
                f"Assignees strategy {self.strategy!r}: use 'claim' or 'workload'."
            )


@dataclass(frozen=True, slots=True)
class Escalation:
    """One step of an escalation policy, fired ``after`` the task's due time (or its
    creation, when it has no due time) if the task is still open.

    * ``reassign``: the task goes back to the pool of ``users``/``groups`` (and, with
      ``to_manager``, the manager of the current assignee or candidates);
    * ``notify``: the notifier tells the assignee or candidates; nothing else changes;
    * ``auto_decide``: the task is completed with ``decision`` (validated against the form
      when the workflow creates the task) and the stated ``reason``.

    Pass a list to escalate in stages; each stage is recorded on the task and in the audit.
    """

    action: Literal["reassign", "notify", "auto_decide"]
    after: timedelta = timedelta(0)
    users: Sequence[str] = ()
    groups: Sequence[str] = ()
    to_manager: bool = False
    decision: BaseModel | dict[str, Any] | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def reassign(
        cls,
        after: timedelta = timedelta(0),
        *,
        users: Sequence[str] = (),
        groups: Sequence[str] = (),
        to_manager: bool = False,
        reason: str = "",
    ) -> Escalation:
        return cls("reassign", after, users, groups, to_manager, reason=reason)

    @classmethod
    def notify(cls, after: timedelta = timedelta(0), *, reason: str = "") -> Escalation:
        return cls("notify", after, reason=reason)

    @classmethod
    def auto_decide(
        cls,
        decision: BaseModel | dict[str, Any],
        after: timedelta = timedelta(0),
        *,
        reason: str,
    ) -> Escalation:
        return cls("auto_decide", after, decision=decision, reason=reason)

    def policy(self, form: type[BaseModel]) -> dict[str, Any]:
        """The stored form of this stage (decisions validated against ``form``)."""
        if self.action not in ("reassign", "notify", "auto_decide"):
            raise errors.ConfigurationError(
                f"Escalation action {self.action!r}: use reassign, notify or auto_decide."
            )
        if self.after < timedelta(0):
            raise errors.ConfigurationError("Escalation.after must not be negative.")
        decision: Any = None
        if self.action == "auto_decide":
            if self.decision is None or not self.reason:
                raise errors.ConfigurationError(
                    "An auto_decide escalation needs a decision and a stated reason."
                )
            raw = (
                self.decision.model_dump(mode="json")
                if isinstance(self.decision, BaseModel)
                else self.decision
            )
            try:
                decision = form.model_validate(raw).model_dump(mode="json")
            except ValidationError as exc:
                raise errors.ConfigurationError(
                    f"The auto_decide default does not fit the form {form.__name__}: {exc}"
                ) from None
        if self.action == "reassign" and not (self.users or self.groups or self.to_manager):
            raise errors.ConfigurationError(
                "A reassign escalation needs users, groups or to_manager=True."
            )
        return {
            "action": self.action,
            "after_ms": int(self.after.total_seconds() * 1000),
            "users": list(self.users),
            "groups": list(self.groups),
            "to_manager": self.to_manager,
            "decision": decision,
            "reason": self.reason,
            **self.extra,
        }


class Notifier(Protocol):
    """Told of every escalation after it committed (at most once per escalation)."""

    async def __call__(self, event: Escalated) -> None: ...


class LogNotifier:
    """The default notifier: one log line per escalation."""

    async def __call__(self, event: Escalated) -> None:
        log.warning(
            "task %s escalated (level %d, %s): %s -> %s",
            event.task_id,
            event.level,
            event.action,
            event.reason,
            ", ".join(event.to) or "-",
        )
