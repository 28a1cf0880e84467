"""The REST API's routes.

Every route but ``/health`` and ``/ready`` needs ``Authorization: Bearer <token>``; the
token's user becomes the acting user of the request (`flowdesk.store.audit.ACTOR`), so
audit records name them and the runs they start record them as initiator. Each route
checks one permission (`flowdesk.governance.identity.PERMISSIONS`). Errors are JSON
``{"error", "message", "errors"?}`` (see `flowdesk.server.app`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity as ident
from flowdesk.governance import privacy
from flowdesk.humans import inbox as inbox_mod
from flowdesk.server import schemas as s
from flowdesk.store import audit, base, people
from flowdesk.store import sql as sql_store


@dataclass(frozen=True, slots=True)
class Services:
    """What the routes work with; kept on ``FastAPI.state.flowdesk``."""

    app: App
    identity: ident.Identity
    inbox: inbox_mod.Inbox
    audit: audit_log.AuditLog


def services(request: Request) -> Services:
    found: Services = request.app.state.flowdesk
    return found


Svc = Annotated[Services, Depends(services)]

# -- authentication and permissions --------------------------------------------------------
bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`flowdesk tokens create`, or POST /users/{user_id}/tokens).",
)


async def authenticated(
    svc: Svc,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> AsyncIterator[people.UserRecord]:
    """The token's user, who is the acting user for the rest of the request."""
    user = await svc.identity.authenticate(None if credentials is None else credentials.credentials)
    token = audit.ACTOR.set(user.id)
    try:
        yield user
    finally:
        audit.ACTOR.reset(token)


User = Annotated[people.UserRecord, Depends(authenticated)]


def need(permission: str) -> Callable[[people.UserRecord], Awaitable[people.UserRecord]]:
    async def check(user: User) -> people.UserRecord:
        ident.require(user, permission)
        return user

    return check


RunsRead = Annotated[people.UserRecord, Depends(need("runs:read"))]
RunsWrite = Annotated[people.UserRecord, Depends(need("runs:write"))]
TasksRead = Annotated[people.UserRecord, Depends(need("tasks:read"))]
TasksAct = Annotated[people.UserRecord, Depends(need("tasks:act"))]
AuditRead = Annotated[people.UserRecord, Depends(need("audit:read"))]
AuditWrite = Annotated[people.UserRecord, Depends(need("audit:write"))]
Admin = Annotated[people.UserRecord, Depends(need("users:admin"))]
PrivacyErase = Annotated[people.UserRecord, Depends(need("privacy:erase"))]
PayloadRead = Annotated[people.UserRecord, Depends(need("payload:read"))]


async def revealed(
    svc: Services, user: people.UserRecord, run_ids: list[str], what: str, **extra: Any
) -> bool:
    """Whether ``user`` sees decrypted payloads (``payload:read``); if so, the read is
    audited (who, which runs) before the payloads leave the server."""
    if not ident.allowed(user, "payload:read") or not run_ids:
        return False
    data = {"what": what, "runs": run_ids, **extra}
    subject = "run:" + run_ids[0] if len(run_ids) == 1 else "runs"
    await svc.app.submit(lambda tx: _audit_read(tx, subject, data), actor=user.id)
    return True


async def _audit_read(tx: base.Tx, subject: str, data: dict[str, Any]) -> None:
    tx.audit("payload.read", subject, data)


# -- parameters ----------------------------------------------------------------------------


def _id(what: str) -> Any:
    return Path(description=what, min_length=1, max_length=200, pattern=s.NAME_PATTERN)


RunId = Annotated[str, _id("A run's id.")]
TaskId = Annotated[str, _id("A task's id.")]
UserId = Annotated[str, _id("A user's id.")]
TokenId = Annotated[str, _id("A token's id (not its secret).")]
SignalName = Annotated[str, _id("The signal's name.")]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Cursor = Annotated[
    str | None,
    Query(max_length=500, pattern=s.NAME_PATTERN, description="`next_cursor` of a page."),
]
_STATUS_TEXT = {
    400: "The request asks for something the configuration does not allow.",
    401: "No valid bearer token (missing, unknown, expired or revoked).",
    403: "The user's roles (or the four-eyes rule) do not allow this.",
    404: "No such thing, or one the user may not see.",
    409: "The current state does not allow this (or the key was used for other work).",
    413: "The request body is larger than allowed.",
    415: "The request body's media type is not one this route takes.",
    422: "The request (or the form, or the workflow input) is invalid.",
    503: "The store does not answer.",
}


def errs(*codes: int, explicit: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error responses (all `ErrorBody`). ``explicit``: name the JSON
    media type (for routes whose success response is not JSON)."""
    if not explicit:
        return {c: {"model": s.ErrorBody, "description": _STATUS_TEXT[c]} for c in codes}
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        c: {"description": _STATUS_TEXT[c], "content": {"application/json": {"schema": ref}}}
        for c in codes
    }


AUTH = (401, 403)


def invalid(where: str, name: str, message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, name), "msg": message, "input": value}]
    )


def checked_cursor(cursor: str | None) -> str | None:
    """A cursor some page handed out; anything else is refused here (422), not in SQL."""
    if cursor is None:
        return None
    try:
        created, key = sql_store.decode_cursor(cursor)
    except errors.FlowdeskError:
        created, key = -1, ""
    if not (0 <= created <= s.INT63) or not key or "\x00" in key:
        raise invalid("query", "cursor", "Invalid cursor: pass a page's next_cursor.", cursor)
    return cursor


def now() -> datetime:
    return datetime.now(UTC)


router = APIRouter()

# -- health ----------------------------------------------------------------------------------


@router.get("/health", response_model=s.Health, tags=["health"], summary="Liveness")
async def health() -> s.Health:
    """The process answers (nothing else is checked)."""
    return s.Health()


@router.get(
    "/ready",
    response_model=s.Ready,
    responses=errs(503),
    tags=["health"],
    summary="Readiness: the store answers",
)
async def ready(svc: Svc) -> s.Ready | JSONResponse:
    app = svc.app

    async def probe() -> None:
        await app.open()
        await app.store.get_status("-")

    try:
        await asyncio.wait_for(probe(), 5.0)
    except Exception as exc:
        body = s.ErrorBody(error="Unavailable", message=f"the store does not answer: {exc}")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    kind = "postgresql" if app.database_url.startswith("postgres") else "sqlite"
    return s.Ready(store=kind)


@router.get("/me", response_model=s.Me, responses=errs(401), tags=["users"])
async def me(user: User) -> s.Me:
    """The token's user and what they may do."""
    return s.Me.of_user(user)


# -- runs ------------------------------------------------------------------------------------


@router.post(
    "/runs",
    status_code=201,
    response_model=s.StartedRun,
    responses={
        200: {"model": s.StartedRun, "description": "The Idempotency-Key named this run."},
        **errs(*AUTH, 404, 409, 422),
    },
    tags=["runs"],
    summary="Start a run",
)
async def start_run(
    body: s.StartRun,
    svc: Svc,
    user: RunsWrite,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=s.NAME_PATTERN,
            description="The same key (and input) again returns the same run (200).",
        ),
    ] = None,
) -> s.StartedRun:
    """Start ``workflow`` with ``input``; the acting user is the run's initiator."""
    handle = await svc.app.start(
        body.workflow,
        body.input,
        idempotency_key=idempotency_key,
        queue=body.queue,
        priority=body.priority,
    )
    if not handle.created:
        response.status_code = 200
    run = await svc.app.get_run(handle.id)
    return s.StartedRun(**s.RunOut.of(run).model_dump(), created=handle.created)


@router.get(
    "/runs", response_model=s.RunPage, responses=errs(*AUTH, 422), tags=["runs"], summary="List"
)
async def list_runs(
    svc: Svc,
    user: RunsRead,
    status: base.RunStatus | None = None,
    workflow: Annotated[str | None, Query(max_length=200, pattern=s.NAME_PATTERN)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> s.RunPage:
    """Runs, newest first, a page at a time."""
    page = await svc.app.list_runs(
        status=status, workflow=workflow, limit=limit, cursor=checked_cursor(cursor)
    )
    shown = await revealed(svc, user, [r.id for r in page.items], "runs")
    return s.RunPage(
        items=[s.RunOut.of(r, masked=not shown) for r in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/runs/{run_id}", response_model=s.RunOut, responses=errs(*AUTH, 404, 422), tags=["runs"]
)
async def get_run(run_id: RunId, svc: Svc, user: RunsRead) -> s.RunOut:
    """The run; its input, output and error need ``payload:read`` (else masked)."""
    run = await svc.app.get_run(run_id)
    return s.RunOut.of(run, masked=not await revealed(svc, user, [run_id], "run"))


@router.get(
    "/runs/{run_id}/steps",
    response_model=list[s.StepOut],
    responses=errs(*AUTH, 404, 422),
    tags=["runs"],
    summary="The run's timeline",
)
async def run_steps(run_id: RunId, svc: Svc, user: RunsRead) -> list[s.StepOut]:
    """Recorded steps, sleeps, waits, children and tasks, in order (results and errors
    need ``payload:read``, else masked)."""
    steps = await svc.app.steps(run_id)
    shown = await revealed(svc, user, [run_id], "steps")
    return [s.StepOut.of(step, masked=not shown) for step in steps]


@router.post(
    "/runs/{run_id}/signals/{name}",
    status_code=202,
    response_model=s.SignalSent,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["runs"],
    summary="Send a signal",
)
async def send_signal(
    run_id: RunId, name: SignalName, svc: Svc, user: RunsWrite, body: s.SignalIn | None = None
) -> s.SignalSent:
    """Deliver ``payload`` as signal ``name``; a run waiting for it wakes. Names starting
    with ``flowdesk.`` are the engine's own (task completions, child results)."""
    if name.startswith("flowdesk."):
        raise invalid("path", "name", "Signal names starting with 'flowdesk.' are reserved.", name)
    await svc.app.signal(run_id, name, None if body is None else body.payload)
    return s.SignalSent(run_id=run_id, name=name)


@router.post(
    "/runs/{run_id}/cancel",
    response_model=s.RunOut,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["runs"],
)
async def cancel_run(
    run_id: RunId, svc: Svc, user: RunsWrite, body: s.CancelIn | None = None
) -> s.RunOut:
    """Cancel the run and its children (a running one stops at its next step)."""
    reason = body.reason if body is not None and body.reason else f"cancelled by {user.id}"
    await svc.app.cancel(run_id, reason)
    run = await svc.app.get_run(run_id)
    return s.RunOut.of(run, masked=not await revealed(svc, user, [run_id], "run"))


@router.post(
    "/runs/{run_id}/retry",
    response_model=s.RunOut,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["runs"],
)
async def retry_run(run_id: RunId, svc: Svc, user: RunsWrite) -> s.RunOut:
    """Resume a failed run from its failed step."""
    await svc.app.retry(run_id)
    run = await svc.app.get_run(run_id)
    return s.RunOut.of(run, masked=not await revealed(svc, user, [run_id], "run"))


# -- tasks -----------------------------------------------------------------------------------


async def _detail(
    svc: Services, task: people.TaskRecord, user: people.UserRecord | None = None
) -> s.TaskDetail:
    """A task's page. Its context, draft and form data are shown to those who may act on
    it (they decide on them) and to holders of ``payload:read``; the read is audited."""
    events = await svc.app.store.task_events(task.id)
    shown = user is None
    if user is not None and (
        ident.allowed(user, "payload:read")
        or people.may_act(user.person(), task.assignee, task.users, task.groups, task.roles)
    ):
        data = {"what": "task", "runs": [task.run_id], "task": task.id}
        await svc.app.submit(lambda tx: _audit_read(tx, "run:" + task.run_id, data), actor=user.id)
        shown = True
    return s.TaskDetail.of_task(task, events, now(), masked=not shown)


@router.get(
    "/tasks", response_model=s.TaskPage, responses=errs(*AUTH, 422), tags=["tasks"], summary="Inbox"
)
async def list_tasks(
    svc: Svc,
    user: TasksRead,
    mine: Annotated[bool, Query(description="Only tasks assigned to me.")] = False,
    my_groups: Annotated[bool, Query(description="Only tasks offered to my groups.")] = False,
    status: Annotated[list[people.TaskStatus] | None, Query(max_length=4)] = None,
    kind: Annotated[str | None, Query(max_length=200, pattern=s.NAME_PATTERN)] = None,
    min_priority: Annotated[int | None, Query(ge=-s.INT32, le=s.INT32)] = None,
    overdue: bool = False,
    run_id: Annotated[str | None, Query(max_length=200, pattern=s.NAME_PATTERN)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> s.TaskPage:
    """Tasks the user may see (operators and admins: every task), newest first."""
    page = await svc.inbox.tasks(
        user.person(),
        mine=mine,
        my_groups=my_groups,
        status=[str(x) for x in status or ()],
        kind=kind,
        min_priority=min_priority,
        overdue=overdue,
        run_id=run_id,
        limit=limit,
        cursor=checked_cursor(cursor),
    )
    at = now()
    return s.TaskPage(items=[s.TaskOut.of(t, at) for t in page.items], next_cursor=page.next_cursor)


@router.get(
    "/tasks/{task_id}",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 422),
    tags=["tasks"],
)
async def get_task(task_id: TaskId, svc: Svc, user: TasksRead) -> s.TaskDetail:
    """The task with its form (JSON Schema), context, draft and history."""
    return await _detail(svc, await svc.inbox.get(task_id, user.person()), user)


@router.post(
    "/tasks/{task_id}/claim",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["tasks"],
)
async def claim_task(task_id: TaskId, svc: Svc, user: TasksAct) -> s.TaskDetail:
    return await _detail(svc, await svc.inbox.claim(task_id, user.person()), user)


@router.post(
    "/tasks/{task_id}/unclaim",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["tasks"],
)
async def unclaim_task(task_id: TaskId, svc: Svc, user: TasksAct) -> s.TaskDetail:
    return await _detail(svc, await svc.inbox.unclaim(task_id, user.person()), user)


@router.post(
    "/tasks/{task_id}/complete",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["tasks"],
)
async def complete_task(
    task_id: TaskId, body: s.FormData, svc: Svc, user: TasksAct
) -> s.TaskDetail:
    """Submit the form: validated against its schema (422 lists every field error, and
    the task stays open), then the run resumes."""
    return await _detail(svc, await svc.inbox.complete(task_id, user.person(), body.data), user)


@router.post(
    "/tasks/{task_id}/delegate",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["tasks"],
)
async def delegate_task(
    task_id: TaskId, body: s.DelegateIn, svc: Svc, user: TasksAct
) -> s.TaskDetail:
    """Hand the task to another (active) user, who becomes its assignee."""
    return await _detail(svc, await svc.inbox.delegate(task_id, user.person(), body.user), user)


@router.post(
    "/tasks/{task_id}/comments",
    status_code=201,
    response_model=s.TaskEventOut,
    responses=errs(*AUTH, 404, 422),
    tags=["tasks"],
)
async def comment_task(
    task_id: TaskId, body: s.CommentIn, svc: Svc, user: TasksAct
) -> s.TaskEventOut:
    return s.TaskEventOut.of(await svc.inbox.comment(task_id, user.person(), body.text))


@router.put(
    "/tasks/{task_id}/draft",
    response_model=s.TaskDetail,
    responses=errs(*AUTH, 404, 409, 422),
    tags=["tasks"],
)
async def save_draft(task_id: TaskId, body: s.FormData, svc: Svc, user: TasksAct) -> s.TaskDetail:
    """Keep what was typed so far (not validated)."""
    return await _detail(svc, await svc.inbox.save_draft(task_id, user.person(), body.data), user)


# -- audit -----------------------------------------------------------------------------------


class NdjsonResponse(StreamingResponse):
    media_type = "application/x-ndjson"


@router.get(
    "/audit/export",
    response_class=NdjsonResponse,
    responses={
        200: {"description": "One audit record (JSON) per line, in chain order."},
        **errs(*AUTH, 422, explicit=True),
    },
    tags=["audit"],
    summary="Export the audit chain (JSON Lines)",
)
async def export_audit(
    svc: Svc,
    user: AuditRead,
    after_seq: Annotated[int, Query(ge=0, le=s.INT63)] = 0,
    subject: Annotated[str | None, Query(max_length=200, pattern=s.NAME_PATTERN)] = None,
) -> NdjsonResponse:
    rows = svc.audit.rows(after_seq=after_seq, subject=subject)

    async def lines() -> AsyncIterator[str]:
        chunk: list[str] = []
        async for row in rows:
            chunk.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            if len(chunk) >= 500:
                yield "".join(chunk)
                chunk = []
        if chunk:
            yield "".join(chunk)

    return NdjsonResponse(lines())


# -- privacy ---------------------------------------------------------------------------------
SubjectId = Annotated[
    str,
    Path(
        description="A data subject, such as `customer:42`.",
        min_length=1,
        max_length=200,
        pattern=r"^[^\s\x00-\x1f]+$",
    ),
]


@router.get(
    "/subjects/{subject}/export",
    responses=errs(*AUTH, 422),
    tags=["privacy"],
    summary="Everything stored about a data subject",
)
async def export_subject(subject: SubjectId, svc: Svc, user: PayloadRead) -> JSONResponse:
    """The subject's runs with their input, output, error, steps, signals and human tasks,
    decrypted (a subject-access request). The read is audited."""
    data = await privacy.export(svc.app, subject)
    runs = [r["id"] for r in data["runs"]]
    await svc.app.submit(
        lambda tx: _audit_read(tx, "subject:" + subject, {"what": "export", "runs": runs}),
        actor=user.id,
    )
    return JSONResponse(jsonable_encoder(data))


@router.post(
    "/subjects/{subject}/erase",
    response_model=s.Erased,
    responses=errs(*AUTH, 422),
    tags=["privacy"],
    summary="Erase a data subject",
)
async def erase_subject(
    subject: SubjectId, svc: Svc, user: PrivacyErase, body: s.EraseIn | None = None
) -> s.Erased:
    """Destroy the subject's data key and its runs' keys in one transaction, with an
    audit record; unfinished runs are cancelled. Runs keep their metadata."""
    done = await privacy.erase(svc.app, subject, body.reason if body else "", actor=user.id)
    return s.Erased(**done)


@router.get(
    "/audit/verify",
    response_model=s.VerifyReport,
    responses=errs(*AUTH, 400),
    tags=["audit"],
    summary="Verify the audit chain and its checkpoints",
)
async def verify_audit(svc: Svc, user: AuditRead) -> s.VerifyReport:
    return s.VerifyReport.of(await svc.audit.verify())


@router.post(
    "/audit/checkpoint",
    status_code=201,
    response_model=s.CheckpointResult,
    responses=errs(*AUTH, 400),
    tags=["audit"],
    summary="Sign a checkpoint of the chain's head",
)
async def checkpoint_audit(svc: Svc, user: AuditWrite) -> s.CheckpointResult:
    cp = await svc.audit.checkpoint()
    return s.CheckpointResult(checkpoint=None if cp is None else s.CheckpointOut.of(cp))


# -- users and tokens ------------------------------------------------------------------------


@router.post(
    "/users",
    status_code=201,
    response_model=s.UserOut,
    responses=errs(*AUTH, 400, 409, 422),
    tags=["users"],
)
async def create_user(body: s.UserCreate, svc: Svc, user: Admin) -> s.UserOut:
    created = await svc.identity.create_user(
        body.id, name=body.name, roles=body.roles, groups=body.groups, manager=body.manager
    )
    return s.UserOut.of(created)


@router.get("/users", response_model=list[s.UserOut], responses=errs(*AUTH), tags=["users"])
async def list_users(svc: Svc, user: Admin) -> list[s.UserOut]:
    return [s.UserOut.of(u) for u in await svc.identity.list_users()]


@router.patch(
    "/users/{user_id}",
    response_model=s.UserOut,
    responses=errs(*AUTH, 404, 422),
    tags=["users"],
)
async def update_user(user_id: UserId, body: s.UserPatch, svc: Svc, user: Admin) -> s.UserOut:
    """Change roles, groups, manager, or disable (a disabled user's tokens stop working)."""
    updated = await svc.identity.update_user(
        user_id,
        roles=body.roles,
        groups=body.groups,
        manager=body.manager,
        disabled=body.disabled,
    )
    return s.UserOut.of(updated)


@router.get(
    "/users/{user_id}/tokens",
    response_model=list[s.TokenOut],
    responses=errs(*AUTH, 404, 422),
    tags=["users"],
)
async def list_tokens(user_id: UserId, svc: Svc, user: Admin) -> list[s.TokenOut]:
    await svc.identity.get_user(user_id)
    return [s.TokenOut.of(t) for t in await svc.identity.list_tokens(user_id)]


@router.post(
    "/users/{user_id}/tokens",
    status_code=201,
    response_model=s.TokenCreated,
    responses=errs(*AUTH, 404, 422),
    tags=["users"],
)
async def create_token(
    user_id: UserId, body: s.TokenCreate, svc: Svc, user: Admin
) -> s.TokenCreated:
    """A new token; its secret is in this response only."""
    lifetime = None
    if body.expires_in_seconds is not None:
        lifetime = timedelta(seconds=body.expires_in_seconds)
    token, secret = await svc.identity.create_token(user_id, name=body.name, expires_in=lifetime)
    return s.TokenCreated(**s.TokenOut.of(token).model_dump(), secret=secret)


@router.delete(
    "/users/{user_id}/tokens/{token_id}",
    status_code=204,
    response_class=Response,
    responses=errs(*AUTH, 404, 422),
    tags=["users"],
)
async def revoke_token(user_id: UserId, token_id: TokenId, svc: Svc, user: Admin) -> Response:
    """Revoke a token at once."""
    if not any(t.id == token_id for t in await svc.identity.list_tokens(user_id)):
        raise errors.NotFound(f"User {user_id!r} has no token {token_id!r}.")
    await svc.identity.revoke_token(token_id)
    return Response(status_code=204)
