"""The operators' side of the web UI: runs, one run's timeline, the dashboard and the
audit chain.

Reading runs needs ``runs:read``; the signal, cancel and retry buttons appear only for
``runs:write`` (operators, admins), and the routes behind them check it again. The audit
page needs ``audit:read``.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from flowdesk import errors
from flowdesk.server import api, schemas
from flowdesk.server.ui import dashboard as dashboard_mod
from flowdesk.server.ui.pages import (
    AuditRead,
    RunsRead,
    RunsWrite,
    State,
    form_of,
    redirect,
    render,
)
from flowdesk.store import base, sql_ui

router = APIRouter()

RunId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]
SINCE = {"15m": 15, "1h": 60, "24h": 1440, "7d": 10080}
STATUSES = [s.value for s in base.RunStatus]


@router.get("/runs")
async def runs_page(
    request: Request,
    ui: State,
    session: RunsRead,
    workflow: Annotated[str | None, Query(max_length=200)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    since: Annotated[str | None, Query(max_length=10)] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Response:
    app = ui.services.app
    await app.open()
    store = sql_ui.ui_store(app.store)
    status = status if status in STATUSES else None
    minutes = SINCE.get(since or "")
    start = None if minutes is None else base.now_ms() - minutes * 60_000
    try:
        page = await store.find_runs(
            status=status, workflow=workflow or None, since=start, limit=50, cursor=cursor
        )
    except errors.FlowdeskError:  # an edited cursor: start from the top
        page = await store.find_runs(status=status, workflow=workflow or None, since=start)
    return render(
        request,
        "runs.html",
        session,
        runs=page.items,
        next_cursor=page.next_cursor,
        workflows=await store.workflows(),
        statuses=STATUSES,
        spans=list(SINCE),
        filters={"workflow": workflow or "", "status": status or "", "since": since or ""},
        now=datetime.now(UTC),
    )


@router.get("/runs/{run_id}")
async def run_page(request: Request, run_id: RunId, ui: State, session: RunsRead) -> Response:
    return render(request, "run.html", session, **await _run_view(ui, session, run_id))


@router.get("/runs/{run_id}/timeline")
async def run_timeline(request: Request, run_id: RunId, ui: State, session: RunsRead) -> Response:
    """The live part of the run page (polled while the run is active)."""
    return render(request, "_run_live.html", session, **await _run_view(ui, session, run_id))


async def _run_view(ui: Any, session: Any, run_id: str) -> dict[str, Any]:
    """What the run page shows. Its input, output, step results and errors are shown
    decrypted only to holders of ``payload:read`` (each such view is audited, as in the
    API); others see them masked. Erased payloads show as erased to everyone."""
    app = ui.services.app
    run = await app.get_run(run_id)
    steps = await app.steps(run_id)
    if not await api.revealed(ui.services, session.user, [run_id], "run page"):
        run = dataclasses.replace(
            run,
            input=schemas.mask(run.input),
            output=schemas.mask(run.output),
            error=schemas.mask_error(run.error),
        )
        steps = [
            dataclasses.replace(s, output=schemas.mask(s.output), error=schemas.mask_error(s.error))
            for s in steps
        ]
    calls: dict[int | None, list[sql_ui.ModelSample]] = {}
    for seq, call in await sql_ui.ui_store(app.store).run_model_calls(run_id):
        calls.setdefault(seq, []).append(call)
    tasks = {t.seq: t for t in (await app.store.list_tasks(_task_query(run_id))).items}
    longest = max((s.duration_ms or 0.0 for s in steps), default=0.0) or 1.0
    total_cost = sum(c.cost_usd for cs in calls.values() for c in cs)
    return {
        "run": run,
        "steps": steps,
        "calls": calls,
        "tasks": tasks,
        "longest": longest,
        "total_cost": total_cost,
        "now": datetime.now(UTC),
        "error_text": _error_text,
    }


def _task_query(run_id: str) -> Any:
    from flowdesk.store.people import TaskQuery

    return TaskQuery(run_id=run_id, limit=200)


def _error_text(error: dict[str, Any] | None) -> tuple[str, str]:
    """A recorded error as (headline, traceback or details)."""
    if not error:
        return "", ""
    kind = str(error.get("type") or error.get("kind") or "Error")
    message = str(error.get("message") or "")
    trace = error.get("traceback") or error.get("trace") or ""
    if isinstance(trace, list):
        trace = "".join(str(x) for x in trace)
    rest = {k: v for k, v in error.items() if k not in ("type", "kind", "message", "traceback")}
    details = str(trace) or (json.dumps(rest, indent=2, default=str) if rest else "")
    return f"{kind}: {message}" if message else kind, details


@router.post("/runs/{run_id}/{action}")
async def run_action(
    request: Request,
    run_id: RunId,
    action: Annotated[str, Path(pattern="^(signal|cancel|retry)$")],
    ui: State,
    session: RunsWrite,
) -> Response:
    posted = await form_of(request, session)
    app = ui.services.app
    message = None
    try:
        if action == "cancel":
            reason = posted.get("reason", "").strip() or f"cancelled by {session.user.id}"
            await app.cancel(run_id, reason)
        elif action == "retry":
            await app.retry(run_id)
        else:
            name = posted.get("name", "").strip()
            if not name or name.startswith("flowdesk.") or len(name) > 200:
                raise errors.ConfigurationError(
                    "Name the signal (names starting with 'flowdesk.' are the engine's own)."
                )
            text = posted.get("payload", "").strip()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError as exc:
                raise errors.ConfigurationError(
                    f"The payload is not valid JSON: {exc.msg} (line {exc.lineno})."
                ) from None
            await app.signal(run_id, name, payload)
    except (errors.InvalidState, errors.Conflict, errors.ConfigurationError) as exc:
        message = exc.message
    if message is not None:
        view = await _run_view(ui, session, run_id)
        return render(request, "run.html", session, status=409, message=message, **view)
    root = request.scope.get("root_path", "")
    return redirect(request, f"{root}/runs/{quote(run_id)}")


# -- dashboard -------------------------------------------------------------------------------
@router.get("/dashboard")
async def dashboard_page(
    request: Request, ui: State, session: RunsRead, window: str = "1h"
) -> Response:
    board = await dashboard_mod.build(ui.services.app, window)
    return render(
        request, "dashboard.html", session, board=board, windows=list(dashboard_mod.WINDOWS)
    )


@router.get("/dashboard/panels")
async def dashboard_panels(
    request: Request, ui: State, session: RunsRead, window: str = "1h"
) -> Response:
    board = await dashboard_mod.build(ui.services.app, window)
    return render(request, "_panels.html", session, board=board)


# -- audit -----------------------------------------------------------------------------------
@router.get("/audit")
async def audit_page(
    request: Request,
    ui: State,
    session: AuditRead,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=200)] = None,
    subject: Annotated[str | None, Query(max_length=200)] = None,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    app = ui.services.app
    await app.open()
    rows = await sql_ui.ui_store(app.store).audit_page(
        before_seq=before,
        actor=actor or None,
        action=action or None,
        subject=subject or None,
        limit=51,
    )
    records = [
        {
            "seq": int(r[0]),
            "at": base.ms_to_dt(int(r[1])),
            "actor": r[2],
            "action": r[3],
            "subject": r[4],
            "data": _data(r[5]),
            "hash": str(r[6]),
        }
        for r in rows[:50]
    ]
    return render(
        request,
        "audit.html",
        session,
        records=records,
        older=records[-1]["seq"] if len(rows) > 50 else None,
        filters={"actor": actor or "", "action": action or "", "subject": subject or ""},
    )


def _data(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@router.post("/audit/verify")
async def audit_verify(request: Request, ui: State, session: AuditRead) -> Response:
    await form_of(request, session)
    started = datetime.now(UTC)
    report = await ui.services.audit.verify()
    took = datetime.now(UTC) - started
    return render(
        request,
        "_verify.html",
        session,
        report=report,
        took=took / timedelta(milliseconds=1),
        at=started,
    )
