"""Records for the people side of the store: users, API tokens, human tasks.

The store keeps them in the same database, and changes them in the same transactions, as
the runs they belong to: a completed task, the signal that wakes its run, and the audit
record of both commit together.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from flowdesk.store import base, sql_payloads

TASK_SIGNAL = "flowdesk.task:"
"""Completing task T sends the signal ``flowdesk.task:T`` to its run."""

ROLES = ("admin", "operator", "approver", "viewer")


class TaskStatus(enum.StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (TaskStatus.OPEN, TaskStatus.CLAIMED)


@dataclass(frozen=True, slots=True)
class Person:
    """Who acts on a task: a user with their groups and roles. ``privileged`` (operators
    and admins) may act on any task."""

    id: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    privileged: bool = False


def may_act(
    who: Person,
    assignee: str | None,
    users: Sequence[str],
    groups: Sequence[str],
    roles: Sequence[str],
) -> bool:
    """May ``who`` see and act on a task with these candidates? Privileged people, the
    assignee, and any candidate user or member of a candidate group or role may."""
    return (
        who.privileged
        or assignee == who.id
        or who.id in users
        or bool(set(who.groups) & set(groups))
        or bool(set(who.roles) & set(roles))
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTask:
    id: str
    run_id: str
    seq: int
    kind: str
    title: str
    form_schema: str
    form_ref: str | None = None
    context: str | None = None
    users: Sequence[str] = ()
    groups: Sequence[str] = ()
    roles: Sequence[str] = ()
    assign: Literal["claim", "workload"] = "claim"
    priority: int = 0
    labels: Sequence[str] = ()
    four_eyes: bool = False
    due_at: int | None = None
    follow_up_at: int | None = None
    escalation: Sequence[dict[str, Any]] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    id: str
    run_id: str
    seq: int
    kind: str
    title: str
    status: TaskStatus
    priority: int
    labels: list[str]
    form_schema: dict[str, Any]
    form_ref: str | None
    context: Any
    users: list[str]
    groups: list[str]
    roles: list[str]
    assignee: str | None
    initiator: str | None
    four_eyes: bool
    due_at: datetime | None
    follow_up_at: datetime | None
    escalation: list[dict[str, Any]]
    escalation_level: int
    escalate_at: datetime | None
    draft: Any
    result: Any
    completed_by: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    def overdue(self, now: datetime) -> bool:
        return self.status.active and self.due_at is not None and self.due_at < now


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEvent:
    id: int
    task_id: str
    at: datetime
    actor: str
    kind: str
    data: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQuery:
    """Filters for an inbox. ``viewer`` limits the list to tasks that person may see
    (candidate or assignee) unless privileged; None lists every task."""

    viewer: Person | None = None
    mine: bool = False  # assigned to the viewer
    my_groups: bool = False  # offered to one of the viewer's groups
    status: Sequence[str] = ()
    kind: str | None = None
    min_priority: int | None = None
    overdue: bool = False
    run_id: str | None = None
    limit: int = 50
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class TaskPage:
    items: list[TaskRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    id: str
    name: str
    roles: list[str]
    groups: list[str]
    manager: str | None
    disabled: bool
    created_at: datetime

    def person(self) -> Person:
        return Person(
            self.id,
            tuple(self.groups),
            tuple(self.roles),
            privileged=bool({"admin", "operator"} & set(self.roles)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    id: str
    user_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Escalated:
    """What an escalation did, for the notifier."""

    task_id: str
    run_id: str
    level: int
    action: str
    reason: str
    to: list[str] = field(default_factory=list)


TASK_COLUMNS = (
    "id, run_id, seq, kind, title, status, priority, labels, form_schema, form_ref, context,"
    " candidates, assignee, initiator, four_eyes, due_at, follow_up_at, escalation,"
    " escalation_level, escalate_at, draft, result, completed_by, created_at, updated_at,"
    " completed_at"
)
USER_COLUMNS = "id, name, roles, user_groups, manager, disabled, created_at"
TOKEN_COLUMNS = "id, user_id, name, created_at, expires_at, revoked_at, last_used_at"


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def task_from_row(r: Sequence[Any], keys: sql_payloads.RunKeys | None = None) -> TaskRecord:
    """A task from its row; ``keys`` opens its sealed context, draft and form data."""
    k = keys or sql_payloads.RunKeys(None)
    cands = json.loads(r[11])
    return TaskRecord(
        id=r[0],
        run_id=r[1],
        seq=r[2],
        kind=r[3],
        title=r[4],
        status=TaskStatus(r[5]),
        priority=r[6],
        labels=json.loads(r[7]),
        form_schema=json.loads(r[8]),
        form_ref=r[9],
        context=k.json(r[1], r[2], "task.context", r[10]),
        users=cands.get("users", []),
        groups=cands.get("groups", []),
        roles=cands.get("roles", []),
        assignee=r[12],
        initiator=r[13],
        four_eyes=bool(r[14]),
        due_at=base.ms_to_dt(r[15]),
        follow_up_at=base.ms_to_dt(r[16]),
        escalation=_loads(r[17]) or [],
        escalation_level=r[18],
        escalate_at=base.ms_to_dt(r[19]),
        draft=k.json(r[1], r[2], "task.draft", r[20]),
        result=k.json(r[1], r[2], "task.result", r[21]),
        completed_by=r[22],
        created_at=base.ms_to_dt(r[23]),  # type: ignore[arg-type]
        updated_at=base.ms_to_dt(r[24]),  # type: ignore[arg-type]
        completed_at=base.ms_to_dt(r[25]),
    )


def user_from_row(r: Sequence[Any]) -> UserRecord:
    return UserRecord(
        id=r[0],
        name=r[1],
        roles=json.loads(r[2]),
        groups=json.loads(r[3]),
        manager=r[4],
        disabled=bool(r[5]),
        created_at=base.ms_to_dt(r[6]),  # type: ignore[arg-type]
    )


def token_from_row(r: Sequence[Any]) -> TokenRecord:
    return TokenRecord(
        id=r[0],
        user_id=r[1],
        name=r[2],
        created_at=base.ms_to_dt(r[3]),  # type: ignore[arg-type]
        expires_at=base.ms_to_dt(r[4]),
        revoked_at=base.ms_to_dt(r[5]),
        last_used_at=base.ms_to_dt(r[6]),
    )
