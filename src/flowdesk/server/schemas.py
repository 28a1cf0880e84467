"""What the REST API accepts and returns (Pydantic models, shown in its OpenAPI schema).

Datetimes are ISO 8601 strings in UTC. Payloads (run input and output, step results, form
data, drafts, signal payloads) are plain JSON; numbers must be finite.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.store import base, payloads, people

INT32 = 2**31 - 1
INT63 = 2**63 - 1

# Ids and names are stored as given: no control characters (PostgreSQL refuses NUL).
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
TEXT_PATTERN = r"^[^\x00]*$"
USER_ID_PATTERN = r"^[a-z0-9][a-z0-9._@-]{0,63}$"  # as `identity.create_user` wants it

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=NAME_PATTERN, strict=True)
]
Text = Annotated[str, StringConstraints(max_length=10_000, pattern=TEXT_PATTERN, strict=True)]
Role = Literal["admin", "operator", "approver", "viewer"]


def _plain_json(value: Any) -> Any:
    """Refuse what cannot be stored as JSON text: NaN and infinities, strings that are not
    valid Unicode (lone surrogates)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("strings must be valid Unicode") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


JsonValue = Annotated[Any, AfterValidator(_plain_json)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_plain_json)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors and health ---------------------------------------------------------------------
class ErrorDetail(BaseModel):
    field: str = Field(description="Dotted path of the offending field ('' for the whole).")
    message: str
    type: str | None = None


class ErrorBody(BaseModel):
    """Every error response: the error's class name, a message, and field errors."""

    error: str = Field(examples=["TaskNotFound"])
    message: str
    errors: list[ErrorDetail] | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    store: str = Field(description="The store's kind: sqlite or postgresql.")


# -- users and tokens ------------------------------------------------------------------------
class UserOut(BaseModel):
    id: str
    name: str
    roles: list[str]
    groups: list[str]
    manager: str | None
    disabled: bool
    created_at: datetime

    @classmethod
    def of(cls, user: people.UserRecord) -> UserOut:
        return cls(
            id=user.id,
            name=user.name,
            roles=list(user.roles),
            groups=list(user.groups),
            manager=user.manager,
            disabled=user.disabled,
            created_at=user.created_at,
        )


class Me(UserOut):
    permissions: list[str] = Field(description="What the user's roles allow.")

    @classmethod
    def of_user(cls, user: people.UserRecord) -> Me:
        allowed = [p for p in identity.PERMISSIONS if identity.allowed(user, p)]
        return cls(**UserOut.of(user).model_dump(), permissions=allowed)


def _viewer() -> list[Role]:
    return ["viewer"]


class UserCreate(_In):
    id: Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)] = Field(
        description="1-64 lowercase letters, digits, '.', '_', '@' or '-', starting with a "
        "letter or digit (ids starting with 'system' are reserved: 400)."
    )
    name: Name | None = None
    roles: list[Role] = Field(default_factory=_viewer, max_length=4)
    groups: list[Name] = Field(default_factory=list, max_length=100)
    manager: Name | None = None


class UserPatch(_In):
    roles: list[Role] | None = Field(default=None, max_length=4)
    groups: list[Name] | None = Field(default=None, max_length=100)
    manager: Name | None = None
    disabled: bool | None = None


class TokenCreate(_In):
    name: Name = "api"
    expires_in_seconds: float | None = Field(
        default=None,
        ge=0.001,
        le=10 * 365 * 86400,
        description="Lifetime in seconds (at least a millisecond); none: never expires.",
    )


class TokenOut(BaseModel):
    id: str
    user_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: people.TokenRecord) -> TokenOut:
        return cls(
            id=token.id,
            user_id=token.user_id,
            name=token.name,
            created_at=token.created_at,
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
        )


class TokenCreated(TokenOut):
    secret: str = Field(description="The bearer token. Shown only now: it is stored hashed.")


# -- runs ----------------------------------------------------------------------------------
MASKED = "$masked"
_MASK_REASON = "needs the payload:read permission"


def mask(value: Any) -> Any:
    """A payload as shown without ``payload:read``: ``{"$masked": ...}``; an erased one
    stays ``{"$erased": reason}`` (nothing to hide), None stays None."""
    if value is None or payloads.is_erased(value):
        return value
    return {MASKED: _MASK_REASON}


def mask_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """An error keeps its type (what went wrong) and loses its message and traceback."""
    if error is None or payloads.is_erased(error):
        return error
    return {"type": error.get("type"), MASKED: _MASK_REASON}


class EraseIn(_In):
    reason: str = Field(default="", max_length=500, description="Recorded in the audit.")


class Erased(BaseModel):
    subject: str
    runs: list[str] = Field(description="The subject's runs: their payloads are gone.")
    cancelled: list[str] = Field(description="Those that had not finished: cancelled.")
    keys: list[str] = Field(description="Ids of the destroyed data keys.")


class StartRun(_In):
    workflow: Name
    input: JsonObject | None = None
    queue: Name | None = None
    priority: int = Field(default=0, ge=-INT32, le=INT32)


class RunOut(BaseModel):
    id: str
    workflow: str
    queue: str
    priority: int
    status: base.RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    parent_id: str | None
    parent_seq: int | None
    forked_from: str | None
    forked_seq: int | None
    attempts: int
    cancel_requested: bool
    failed_seq: int | None
    waiting_for: list[str]
    concurrency_key: str | None
    due_at: datetime | None
    deadline_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, run: base.RunRecord, *, masked: bool = False) -> RunOut:
        return cls(
            id=run.id,
            workflow=run.workflow,
            queue=run.queue,
            priority=run.priority,
            status=run.status,
            input=mask(run.input) if masked else run.input,
            output=mask(run.output) if masked else run.output,
            error=mask_error(run.error) if masked else run.error,
            idempotency_key=run.idempotency_key,
            parent_id=run.parent_id,
            parent_seq=run.parent_seq,
            forked_from=run.forked_from,
            forked_seq=run.forked_seq,
            attempts=run.attempts,
            cancel_requested=run.cancel_requested,
            failed_seq=run.failed_seq,
            waiting_for=list(run.waiting_for),
            concurrency_key=run.concurrency_key,
            due_at=run.due_at,
            deadline_at=run.deadline_at,
            created_at=run.created_at,
            started_at=run.started_at,
            updated_at=run.updated_at,
            finished_at=run.finished_at,
        )


class StartedRun(RunOut):
    created: bool = Field(description="False when the Idempotency-Key named an earlier run.")


class RunPage(BaseModel):
    items: list[RunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class StepOut(BaseModel):
    seq: int
    name: str
    kind: str
    status: str
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None
    output: Any
    error: dict[str, Any] | None

    @classmethod
    def of(cls, step: base.StepRecord, *, masked: bool = False) -> StepOut:
        return cls(
            seq=step.seq,
            name=step.name,
            kind=step.kind,
            status=step.status,
            attempts=step.attempts,
            started_at=step.started_at,
            finished_at=step.finished_at,
            duration_ms=step.duration_ms,
            output=mask(step.output) if masked else step.output,
            error=mask_error(step.error) if masked else step.error,
        )


class SignalIn(_In):
    payload: JsonValue = None


class SignalSent(BaseModel):
    run_id: str
    name: str


class CancelIn(_In):
    reason: Text | None = None


# -- tasks ---------------------------------------------------------------------------------
class TaskEventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    kind: str
    data: Any

    @classmethod
    def of(cls, event: people.TaskEvent) -> TaskEventOut:
        return cls(id=event.id, at=event.at, actor=event.actor, kind=event.kind, data=event.data)


class TaskOut(BaseModel):
    id: str
    run_id: str
    seq: int
    kind: str
    title: str
    status: people.TaskStatus
    priority: int
    labels: list[str]
    users: list[str]
    groups: list[str]
    roles: list[str]
    assignee: str | None
    initiator: str | None
    four_eyes: bool
    overdue: bool
    due_at: datetime | None
    follow_up_at: datetime | None
    escalation_level: int
    escalate_at: datetime | None
    completed_by: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @staticmethod
    def fields(task: people.TaskRecord, now: datetime) -> dict[str, Any]:
        return {
            "id": task.id,
            "run_id": task.run_id,
            "seq": task.seq,
            "kind": task.kind,
            "title": task.title,
            "status": task.status,
            "priority": task.priority,
            "labels": list(task.labels),
            "users": list(task.users),
            "groups": list(task.groups),
            "roles": list(task.roles),
            "assignee": task.assignee,
            "initiator": task.initiator,
            "four_eyes": task.four_eyes,
            "overdue": task.overdue(now),
            "due_at": task.due_at,
            "follow_up_at": task.follow_up_at,
            "escalation_level": task.escalation_level,
            "escalate_at": task.escalate_at,
            "completed_by": task.completed_by,
            "created_at": task.created_at,
            "updated_at": task.updated_at,
            "completed_at": task.completed_at,
        }

    @classmethod
    def of(cls, task: people.TaskRecord, now: datetime) -> TaskOut:
        return cls(**cls.fields(task, now))


class TaskDetail(TaskOut):
    form_schema: dict[str, Any] = Field(description="JSON Schema of the form to submit.")
    form_ref: str | None
    context: Any = Field(description="What the person reads to decide.")
    draft: Any
    result: Any
    escalation: list[dict[str, Any]]
    events: list[TaskEventOut]

    @classmethod
    def of_task(
        cls,
        task: people.TaskRecord,
        events: list[people.TaskEvent],
        now: datetime,
        *,
        masked: bool = False,
    ) -> TaskDetail:
        return cls(
            **TaskOut.fields(task, now),
            form_schema=task.form_schema,
            form_ref=task.form_ref,
            context=mask(task.context) if masked else task.context,
            draft=mask(task.draft) if masked else task.draft,
            result=mask(task.result) if masked else task.result,
            escalation=list(task.escalation),
            events=[TaskEventOut.of(e) for e in events],
        )


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class FormData(_In):
    data: JsonValue = Field(description="The form, as its JSON Schema describes it.")


class DelegateIn(_In):
    user: Name = Field(description="The user who takes the task over.")


class CommentIn(_In):
    text: Annotated[
        str, StringConstraints(min_length=1, max_length=10_000, pattern=r"\S", strict=True)
    ]


# -- audit ---------------------------------------------------------------------------------
class ProblemOut(BaseModel):
    seq: int
    kind: str
    message: str


class VerifyReport(BaseModel):
    ok: bool
    records: int
    head_seq: int
    checkpoints: int
    last_checkpoint: int
    unanchored: int
    first_bad_seq: int | None
    problems: list[ProblemOut]
    more_problems: int

    @classmethod
    def of(cls, report: audit_log.Report) -> VerifyReport:
        return cls.model_validate(report.as_dict())


class CheckpointOut(BaseModel):
    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: str

    @classmethod
    def of(cls, cp: audit_log.Checkpoint) -> CheckpointOut:
        at = base.ms_to_dt(cp.at)
        assert at is not None
        return cls(seq=cp.seq, hash=cp.hash, at=at, key_id=cp.key_id, signature=cp.signature)


class CheckpointResult(BaseModel):
    checkpoint: CheckpointOut | None = Field(description="None while the chain is empty.")
