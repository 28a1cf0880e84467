"""The people's side of the web UI: sign-in, the inbox, and the task page.

A task page shows what the person needs to decide, read from the task's context: its
summary, the model's suggestion and confidence, the reasons it came to a person, the
source document (page previews with each extracted field outlined where it was read) and
the form generated from the task's schema. Any other context is shown as key/value pairs.
Every action (claim, release, complete, save a draft, delegate, comment) is a POST that
carries the session's CSRF token and goes through `flowdesk.humans.inbox.Inbox`, exactly
as the REST API does: the same permissions, validation, audit records and run wake-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from flowdesk import errors
from flowdesk.governance import identity as ident
from flowdesk.humans import inbox as inbox_mod
from flowdesk.server.ui import auth, formgen, preview
from flowdesk.server.ui.pages import (
    Signed,
    State,
    TasksAct,
    TasksRead,
    UiState,
    can,
    form_of,
    redirect,
    render,
)
from flowdesk.store import people

router = APIRouter()

TaskId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]
INBOX_LIMIT = 200
KNOWN_CONTEXT = ("summary", "title", "reasons", "suggestion", "document", "fields")


def _safe_next(target: str | None, root: str) -> str:
    """Only a path inside the UI (never another site) after signing in."""
    if target and target.startswith(root + "/") and not target.startswith("//"):
        return target
    return root + "/inbox"


# -- sign-in ---------------------------------------------------------------------------------
@router.get("/login")
async def login_page(request: Request, ui: State, next: str | None = None) -> Response:
    root = request.scope.get("root_path", "")
    if await ui.sessions.resolve(request.cookies.get(auth.COOKIE)) is not None:
        return redirect(request, _safe_next(next, root))  # signed in already
    token = ui.sessions.login_token()
    response = render(
        request, "login.html", None, login_token=token, next=_safe_next(next, root), error=None
    )
    ui.sessions.set_cookie(request, response, auth.LOGIN_COOKIE, token)
    return response


@router.post("/login")
async def login(request: Request, ui: State) -> Response:
    body = (await request.body())[:10_000].decode("utf-8", "replace")
    from urllib.parse import parse_qsl

    posted = dict(parse_qsl(body, keep_blank_values=True))
    root = request.scope.get("root_path", "")
    target = _safe_next(posted.get("next"), root)
    user_id = posted.get("user", "").strip().lower()
    headers: dict[str, str] = {}
    if not ui.sessions.login_token_ok(
        request.cookies.get(auth.LOGIN_COOKIE), posted.get(auth.CSRF_FIELD)
    ):
        error = "The sign-in form expired. Please try again."
        status = 403
    else:
        address = request.client.host if request.client is not None else None
        try:
            cookie, _ = await ui.sessions.sign_in(user_id, posted.get("password", ""), address)
        except errors.SignInThrottled as exc:
            error, status = exc.message, 429
            headers["Retry-After"] = str(exc.retry_after)
        except errors.Unauthenticated as exc:
            error, status = exc.message, 401
        else:
            response = redirect(request, target)
            ui.sessions.set_cookie(request, response, auth.COOKIE, cookie)
            ui.sessions.clear_cookie(request, response, auth.LOGIN_COOKIE)
            return response
    token = ui.sessions.login_token()
    response = render(
        request,
        "login.html",
        None,
        status=status,
        headers=headers,
        login_token=token,
        next=target,
        error=error,
        user_id=user_id,
    )
    ui.sessions.set_cookie(request, response, auth.LOGIN_COOKIE, token)
    return response


@router.post("/logout")
async def logout(request: Request, ui: State, session: Signed) -> Response:
    await form_of(request, session)
    await ui.sessions.sign_out(request.cookies.get(auth.COOKIE))
    response = redirect(request, request.scope.get("root_path", "") + "/login")
    ui.sessions.clear_cookie(request, response, auth.COOKIE)
    return response


@router.get("/")
async def home(request: Request, session: Signed) -> Response:
    root = request.scope.get("root_path", "")
    if can(session.user, "tasks:read"):
        return redirect(request, root + "/inbox")
    return redirect(request, root + "/runs")


# -- inbox -----------------------------------------------------------------------------------
def _inbox_order(now: datetime) -> Any:
    """Overdue first (most overdue on top), then higher priority, then due soonest, then
    oldest."""
    far = datetime.max.replace(tzinfo=UTC)

    def key(t: people.TaskRecord) -> tuple[int, int, datetime, datetime]:
        return (0 if t.overdue(now) else 1, -t.priority, t.due_at or far, t.created_at)

    return key


@router.get("/inbox")
async def inbox_page(
    request: Request,
    ui: State,
    session: TasksRead,
    view: Annotated[str, Query(pattern="^(all|mine|groups)$")] = "all",
    status: Annotated[str, Query(pattern="^(active|open|claimed|completed|cancelled)$")] = "active",
    kind: Annotated[str | None, Query(max_length=200)] = None,
    overdue: bool = False,
) -> Response:
    statuses = ["open", "claimed"] if status == "active" else [status]
    inbox = ui.services.inbox
    page = await inbox.tasks(
        session.user.person(),
        mine=view == "mine",
        my_groups=view == "groups",
        status=statuses,
        kind=kind or None,
        overdue=overdue,
        limit=INBOX_LIMIT,
    )
    now = datetime.now(UTC)
    items = sorted(page.items, key=_inbox_order(now))
    kinds = sorted({t.kind for t in items} | ({kind} if kind else set()))
    return render(
        request,
        "inbox.html",
        session,
        tasks=items,
        now=now,
        filters={"view": view, "status": status, "kind": kind or "", "overdue": overdue},
        kinds=kinds,
        more=page.next_cursor is not None,
        summary_of=_summary_of,
    )


def _summary_of(task: people.TaskRecord) -> str:
    ctx = task.context
    if isinstance(ctx, Mapping):
        for key in ("summary", "title", "subject", "question"):
            if isinstance(ctx.get(key), str) and ctx[key].strip():
                return str(ctx[key])[:160]
    return ""


# -- the task page ---------------------------------------------------------------------------
def _boxes(
    document: Mapping[str, Any], fields: Mapping[str, Any]
) -> dict[int, list[dict[str, Any]]]:
    """Highlight boxes per page (1-based), in percent of the page, for each extracted
    field that says where it was read."""
    found = document.get("pages")
    pages: list[Any] = found if isinstance(found, list) else []
    out: dict[int, list[dict[str, Any]]] = {}
    for name, f in fields.items():
        if not isinstance(f, Mapping):
            continue
        page, bbox = f.get("page"), f.get("bbox")
        if not isinstance(page, int) or not 1 <= page <= len(pages):
            continue
        if not (isinstance(bbox, list) and len(bbox) == 4):
            continue
        size = pages[page - 1]
        try:
            w, h = float(size["width"]), float(size["height"])
            x0, y0, x1, y1 = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            continue
        if w <= 0 or h <= 0:
            continue
        confidence = f.get("confidence")
        out.setdefault(page, []).append(
            {
                "name": str(name),
                "label": str(name).replace("_", " ").capitalize(),
                "value": f.get("value"),
                "confidence": confidence if isinstance(confidence, int | float) else None,
                "low": isinstance(confidence, int | float) and confidence < 0.6,
                "left": max(0.0, min(100.0, x0 / w * 100)),
                "top": max(0.0, min(100.0, y0 / h * 100)),
                "width": max(0.4, min(100.0, (x1 - x0) / w * 100)),
                "height": max(0.4, min(100.0, (y1 - y0) / h * 100)),
            }
        )
    return out


def _context_view(task: people.TaskRecord, ui: UiState) -> dict[str, Any]:
    ctx = task.context
    if not isinstance(ctx, Mapping):
        return {
            "summary": None,
            "reasons": [],
            "suggestion": None,
            "document": None,
            "fields": {},
            "other": {} if ctx is None else {"context": ctx},
            "boxes": {},
        }
    given = ctx.get("fields")
    fields: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    document = ctx.get("document") if isinstance(ctx.get("document"), Mapping) else None
    reasons = ctx.get("reasons")
    if not isinstance(reasons, list):
        reasons = [ctx["why"]] if isinstance(ctx.get("why"), str) else []
    found_sg = ctx.get("suggestion")
    suggestion: dict[str, Any] = dict(found_sg) if isinstance(found_sg, Mapping) else {}
    if isinstance(found_sg, str):
        suggestion = {"answer": found_sg}
    used = set(KNOWN_CONTEXT) | {"why"}
    for key in ("confidence", "risk"):  # the model's figures may sit beside the suggestion
        if key not in suggestion and isinstance(ctx.get(key), int | float | str):
            if key == "confidence" and not isinstance(ctx[key], int | float):
                continue
            suggestion[key] = ctx[key]
            used.add(key)
    summary = None
    for key in ("summary", "title", "text", "message", "question", "justification"):
        if isinstance(ctx.get(key), str) and ctx[key].strip():
            summary = ctx[key]
            used.add(key)
            break
    page_count = 0
    if document is not None:
        pages = document.get("pages")
        page_count = len(pages) if isinstance(pages, list) else 1
    return {
        "summary": summary,
        "reasons": [str(r) for r in reasons],
        "suggestion": suggestion or None,
        "document": document,
        "previewable": document is not None and ui.documents is not None,
        "page_count": max(1, page_count),
        "fields": fields,
        "boxes": _boxes(document, fields) if document is not None else {},
        "other": {k: v for k, v in ctx.items() if k not in used},
    }


async def _task_page(
    request: Request,
    ui: UiState,
    session: Signed,
    task: people.TaskRecord,
    *,
    status: int = 200,
    message: str | None = None,
    posted: Mapping[str, str] | None = None,
    problems: list[dict[str, Any]] | None = None,
) -> Response:
    view = _context_view(task, ui)
    values = task.draft if isinstance(task.draft, Mapping) else None
    if task.status == people.TaskStatus.COMPLETED and isinstance(task.result, Mapping):
        values = task.result
    fields = formgen.fields_of(task.form_schema, values, view["fields"])
    loose: list[str] = []
    if posted is not None:
        formgen.values_from_posted(fields, posted)
    if problems:
        loose = formgen.attach_errors(fields, problems)
    events = await ui.services.app.store.task_events(task.id)
    people_list: list[str] = []
    if task.status.active and can(session.user, "tasks:act"):
        people_list = [
            u.id
            for u in await ui.services.identity.list_users()
            if not u.disabled and ident.allowed(u, "tasks:act") and u.id != session.user.id
        ]
    me = session.user.person()
    return render(
        request,
        "task.html",
        session,
        status=status,
        task=task,
        ctx=view,
        fields=fields,
        loose_errors=loose,
        message=message,
        events=events,
        delegates=people_list,
        now=datetime.now(UTC),
        may_act=can(session.user, "tasks:act") and task.status.active,
        mine=task.assignee == me.id,
    )


async def _visible_task(ui: UiState, task_id: str, session: auth.Session) -> people.TaskRecord:
    """The task, or 403 when it exists but is not offered to this person (404 when it
    does not exist)."""
    await ui.services.app.open()
    task = await ui.services.app.store.get_task(task_id)
    if task is None:
        raise errors.TaskNotFound(task_id)
    if not inbox_mod.visible(task, session.user.person()):
        raise errors.PermissionDenied(
            f"Task {task_id} is not offered to you ({session.user.id}): it is for "
            + _candidates(task)
            + ". Ask an operator to delegate it to you if you should handle it."
        )
    return task


def _candidates(task: people.TaskRecord) -> str:
    parts = []
    if task.assignee:
        parts.append(f"assignee {task.assignee}")
    if task.users:
        parts.append("users " + ", ".join(task.users))
    if task.groups:
        parts.append("groups " + ", ".join(task.groups))
    if task.roles:
        parts.append("roles " + ", ".join(task.roles))
    return "; ".join(parts) or "operators only"


@router.get("/tasks/{task_id}")
async def task_page(request: Request, task_id: TaskId, ui: State, session: TasksRead) -> Response:
    task = await _visible_task(ui, task_id, session)
    return await _task_page(request, ui, session, task)


@router.post("/tasks/{task_id}/{action}")
async def task_action(
    request: Request,
    task_id: TaskId,
    action: Annotated[str, Path(pattern="^(claim|unclaim|complete|delegate|comment)$")],
    ui: State,
    session: TasksAct,
) -> Response:
    posted = await form_of(request, session)
    task = await _visible_task(ui, task_id, session)
    who = session.user.person()
    inbox = ui.services.inbox
    here = f"{request.scope.get('root_path', '')}/tasks/{quote(task_id)}"
    try:
        if action == "claim":
            await inbox.claim(task_id, who)
        elif action == "unclaim":
            await inbox.unclaim(task_id, who)
        elif action == "delegate":
            to = posted.get("to", "").strip().lower()
            if not to:
                raise errors.InvalidForm(task_id, [{"field": "to", "message": "name a person"}])
            await inbox.delegate(task_id, who, to)
        elif action == "comment":
            await inbox.comment(task_id, who, posted.get("text", ""))
        else:
            return await _complete(request, ui, session, task, posted)
    except (errors.Conflict, errors.InvalidState, errors.InvalidForm, errors.NotFound) as exc:
        fresh = await ui.services.app.store.get_task(task_id) or task
        return await _task_page(
            request,
            ui,
            session,
            fresh,
            status=409 if not isinstance(exc, errors.InvalidForm | errors.NotFound) else 422,
            message=exc.message,
        )
    return redirect(request, here)


async def _complete(
    request: Request,
    ui: UiState,
    session: auth.Session,
    task: people.TaskRecord,
    posted: dict[str, str],
) -> Response:
    intent = posted.pop("intent", "complete")
    data, problems = formgen.data_of(task.form_schema, posted)
    here = f"{request.scope.get('root_path', '')}/tasks/{quote(task.id)}"
    who = session.user.person()
    if intent == "draft":
        await ui.services.inbox.save_draft(task.id, who, data)
        return redirect(request, here + "?saved=1")
    if problems:
        return await _task_page(
            request,
            ui,
            session,
            task,
            status=422,
            posted=posted,
            problems=problems,
            message="Some fields need your attention.",
        )
    try:
        await ui.services.inbox.complete(task.id, who, data)
    except errors.FourEyesViolation as exc:  # the requester may not decide their own work
        return await _task_page(
            request, ui, session, task, status=403, posted=posted, message=exc.message
        )
    except errors.InvalidForm as exc:
        return await _task_page(
            request,
            ui,
            session,
            task,
            status=422,
            posted=posted,
            problems=exc.errors,
            message="Some fields need your attention.",
        )
    return redirect(request, here + "?done=1")


@router.get("/tasks/{task_id}/progress")
async def task_progress(
    request: Request, task_id: TaskId, ui: State, session: TasksRead
) -> Response:
    """The run behind a task, as it moves on (polled by the task page until it ends)."""
    task = await _visible_task(ui, task_id, session)
    run = await ui.services.app.get_run(task.run_id)
    steps = [s for s in await ui.services.app.steps(task.run_id) if s.seq >= task.seq]
    return render(request, "_progress.html", session, task=task, run=run, steps=steps)


@router.get("/tasks/{task_id}/pages/{page}.png")
async def task_page_image(
    task_id: TaskId,
    page: Annotated[int, Path(ge=1, le=preview.MAX_PAGES)],
    ui: State,
    session: TasksRead,
) -> Response:
    """A page of the task's source document (only through a task the person may see)."""
    task = await _visible_task(ui, task_id, session)
    doc_id = _document_id(task, ui)
    assert ui.documents is not None
    png = await preview.render_async(ui.documents, doc_id, page)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/tasks/{task_id}/document")
async def task_document(task_id: TaskId, ui: State, session: TasksRead) -> Response:
    """The source document itself, as received."""
    task = await _visible_task(ui, task_id, session)
    doc_id = _document_id(task, ui)
    assert ui.documents is not None
    try:
        data = await asyncio.to_thread(ui.documents.read, doc_id)
        kind = ui.documents.media_type(doc_id)
    except errors.FlowdeskError as exc:
        raise preview.NoPreview(exc.message) from None
    name = "document"
    if isinstance(task.context, Mapping) and isinstance(task.context.get("document"), Mapping):
        name = str(task.context["document"].get("name") or name)
    safe = "".join(c for c in name if c.isalnum() or c in "._-") or "document"
    return Response(
        data,
        media_type=kind,
        headers={
            "Content-Disposition": f'inline; filename="{safe}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=3600",
        },
    )


def _document_id(task: people.TaskRecord, ui: UiState) -> str:
    ctx = task.context
    document = ctx.get("document") if isinstance(ctx, Mapping) else None
    doc_id = document.get("id") if isinstance(document, Mapping) else None
    if not isinstance(doc_id, str):
        raise preview.NoPreview(f"Task {task.id} has no source document.")
    if ui.documents is None:
        raise preview.NoPreview(
            "This server has no document archive: start it with one to show documents."
        )
    return doc_id
