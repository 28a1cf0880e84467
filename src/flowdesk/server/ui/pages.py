"""What every page of the web UI shares: the templates, the signed-in person, CSRF
checks on posted forms, and HTML error pages.

Routes depend on `Signed` (any signed-in user) or on `needs(permission)`; a request
without a live session is sent to the sign-in page (htmx requests get ``HX-Redirect``).
Errors become a page with the status of their kind (`flowdesk.server.app.STATUS`): 403
says which role is needed, 404 says what was not found.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote

import jinja2
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowdesk import errors
from flowdesk.documents import archive as archive_mod
from flowdesk.governance import identity as ident
from flowdesk.server import api
from flowdesk.server.ui import auth
from flowdesk.store import audit as audit_store
from flowdesk.store import people

MAX_FORM_BYTES = 1_000_000

templates = jinja2.Environment(
    loader=jinja2.PackageLoader("flowdesk.server.ui", "templates"),
    autoescape=jinja2.select_autoescape(["html", "svg"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return "" if value is None else value.astimezone(UTC).strftime(fmt)


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = (datetime.now(UTC) - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{int(seconds)}s"
    elif seconds < 3600:
        text = f"{int(seconds // 60)}m"
    elif seconds < 86400:
        text = f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    else:
        text = f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"
    return f"in {text}" if future else f"{text} ago"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return "<1 ms"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.2f} s"
    return f"{value / 60_000:.1f} min"


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _compact(value: Any) -> str:
    """JSON on one line, as plain text (so autoescaping makes it safe in attributes too)."""
    return json.dumps(value, ensure_ascii=False, default=str)


templates.filters.update(when=_when, ago=_ago, ms=_ms, pretty=_pretty, pct=_pct, compact=_compact)
templates.globals.update(quote=quote)


@dataclass(frozen=True, slots=True)
class UiState:
    """What the UI's routes work with; kept on the UI app's ``state.ui``."""

    services: api.Services
    sessions: auth.Sessions
    documents: archive_mod.Archive | None


def state(request: Request) -> UiState:
    found: UiState = request.app.state.ui
    return found


State = Annotated[UiState, Depends(state)]


class SignInRequired(Exception):
    """No live session: go to the sign-in page."""


class CsrfRejected(errors.PermissionDenied):
    """The form did not carry this session's token (an old tab, or another site's form):
    reload the page and try again."""


class FormTooLarge(errors.FlowdeskError):
    """The posted form is too large."""


async def signed_in(request: Request, ui: State) -> Any:
    session = await ui.sessions.resolve(request.cookies.get(auth.COOKIE))
    if session is None:
        raise SignInRequired()
    token = audit_store.ACTOR.set(session.user.id)
    try:
        yield session
    finally:
        audit_store.ACTOR.reset(token)


Signed = Annotated[auth.Session, Depends(signed_in)]


def needs(permission: str) -> Callable[[auth.Session], Awaitable[auth.Session]]:
    async def check(session: Signed) -> auth.Session:
        ident.require(session.user, permission)
        return session

    return check


RunsRead = Annotated[auth.Session, Depends(needs("runs:read"))]
RunsWrite = Annotated[auth.Session, Depends(needs("runs:write"))]
TasksRead = Annotated[auth.Session, Depends(needs("tasks:read"))]
TasksAct = Annotated[auth.Session, Depends(needs("tasks:act"))]
AuditRead = Annotated[auth.Session, Depends(needs("audit:read"))]


async def form_of(request: Request, session: auth.Session) -> dict[str, str]:
    """The posted form (URL-encoded), after checking its CSRF token (field or header)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FormTooLarge(f"The form is larger than {MAX_FORM_BYTES} bytes.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        pairs = []
    posted = dict(pairs)
    sent = posted.pop(auth.CSRF_FIELD, None) or request.headers.get(auth.CSRF_HEADER)
    if not auth.csrf_ok(session, sent):
        raise CsrfRejected()
    return posted


def can(user: people.UserRecord, permission: str) -> bool:
    return not user.disabled and ident.allowed(user, permission)


def render(
    request: Request,
    name: str,
    session: auth.Session | None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    user = None if session is None else session.user
    perms = {p: user is not None and can(user, p) for p in ident.PERMISSIONS}
    html = templates.get_template(name).render(
        request=request,
        user=user,
        csrf=None if session is None else session.csrf,
        can=perms,
        path=request.url.path,
        root=request.scope.get("root_path", ""),
        **values,
    )
    response = HTMLResponse(html, status_code=status, headers=dict(headers or {}))
    response.headers["Cache-Control"] = "no-store"
    return response


def redirect(request: Request, url: str) -> Response:
    """See other: a plain 303, or ``HX-Redirect`` for htmx requests."""
    if request.headers.get("HX-Request"):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


# -- error pages ------------------------------------------------------------------------------
_TITLES = {
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible right now",
    422: "Please check what you entered",
    429: "Too many attempts",
    503: "The database does not answer",
}


def install_error_pages(ui_app: Any) -> None:
    from flowdesk.server.app import status_of  # the one mapping of errors to HTTP

    async def sign_in(request: Request, exc: Exception) -> Response:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        return redirect(request, f"{request.scope.get('root_path', '')}/login?next={quote(target)}")

    async def flowdesk_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.FlowdeskError)
        status = status_of(exc)
        return render(
            request,
            "error.html",
            await _session_or_none(request),
            status=status,
            title=_TITLES.get(status, "Something went wrong"),
            message=exc.message,
            status_code=status,
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        message = {
            404: "There is no page at this address.",
            405: "This page takes no such request.",
        }
        return render(
            request,
            "error.html",
            await _session_or_none(request),
            status=status,
            title=_TITLES.get(status, "Something went wrong"),
            message=message.get(status, str(exc.detail)),
            status_code=status,
        )

    ui_app.add_exception_handler(SignInRequired, sign_in)
    ui_app.add_exception_handler(errors.FlowdeskError, flowdesk_error)
    ui_app.add_exception_handler(StarletteHTTPException, http_error)


async def _session_or_none(request: Request) -> auth.Session | None:
    try:
        found: auth.Session | None = await request.app.state.ui.sessions.resolve(
            request.cookies.get(auth.COOKIE)
        )
        return found
    except errors.FlowdeskError:
        return None
