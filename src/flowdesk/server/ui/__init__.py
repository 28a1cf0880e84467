"""The web UI, served by the API server under ``/ui``: an inbox and task pages for
people, runs, a dashboard and the audit chain for operators.

Server-rendered (Jinja2 templates) with htmx for the parts that refresh in place; htmx
and the stylesheet are files of this package (``static/``), so nothing but Python runs
the UI. `create_ui` builds it as an application of its own, mounted by
`flowdesk.server.app.create_app`, so its HTML error pages and sign-in redirects never
mix with the REST API's JSON errors and it stays out of the API's OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from flowdesk.documents import archive as archive_mod
from flowdesk.server import api
from flowdesk.server.ui import auth, ops, pages, routes, throttle

__all__ = ["create_ui"]

PREFIX = "/ui"


def create_ui(
    services: api.Services,
    *,
    documents: archive_mod.Archive | None = None,
    session_key: str | bytes | None = None,
    session_lifetime: timedelta = timedelta(hours=8),
    signin_limits: throttle.Limits | None = None,
) -> FastAPI:
    """The web UI over the same services as the REST API; ``signin_limits`` throttle
    failed sign-ins (`flowdesk.server.ui.throttle`)."""
    ui = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    sessions = auth.Sessions(
        services.app, auth.session_key(session_key), session_lifetime, signin_limits
    )
    ui.state.ui = pages.UiState(services=services, sessions=sessions, documents=documents)
    static = resources.files("flowdesk.server.ui") / "static"
    ui.mount("/static", StaticFiles(directory=str(static)), name="static")
    ui.include_router(routes.router)
    ui.include_router(ops.router)
    pages.install_error_pages(ui)

    @ui.middleware("http")
    async def headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        )
        return response

    return ui
