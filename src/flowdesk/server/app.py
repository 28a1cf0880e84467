"""The FastAPI application: `create_app` builds it for an `App`, `serve` runs it.

Errors become JSON ``{"error": <class name>, "message": ..., "errors": [...]}`` with the
status of their kind (`STATUS`); request validation failures use the same body (422).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import flowdesk
from flowdesk import errors, observe
from flowdesk.documents import archive as archive_mod
from flowdesk.engine.app import App
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity as ident
from flowdesk.humans import inbox as inbox_mod
from flowdesk.server import api, hooks, schemas
from flowdesk.server import assistants as assistant_routes
from flowdesk.server import metrics as metrics_routes
from flowdesk.server import ui as web_ui
from flowdesk.server.ui import chat as chat_ui
from flowdesk.server.ui import throttle

log = logging.getLogger("flowdesk.server")

STATUS: tuple[tuple[type[errors.FlowdeskError], int], ...] = (
    (errors.NotFound, 404),  # RunNotFound, TaskNotFound, UnknownWorkflow
    (errors.InvalidInput, 422),
    (errors.InvalidForm, 422),
    (errors.SerializationError, 422),
    (errors.InvalidCursor, 422),
    (errors.DocumentTooLarge, 413),
    (errors.UnsupportedDocument, 415),
    (errors.DocumentError, 422),
    (errors.IdempotencyConflict, 409),
    (errors.Conflict, 409),
    (errors.InvalidState, 409),
    (errors.PermissionDenied, 403),  # FourEyesViolation
    (errors.SignInThrottled, 429),
    (errors.Unauthenticated, 401),  # BadSignature, StaleDelivery (webhooks)
    (errors.SecretUnavailable, 503),  # a webhook's secret is not configured
    (errors.ConfigurationError, 400),
    (errors.StoreError, 503),
)
"""HTTP status of each kind of flowdesk error (first match wins; others: 400)."""


def status_of(exc: errors.FlowdeskError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 400)


def _details(exc: errors.FlowdeskError) -> list[schemas.ErrorDetail] | None:
    if isinstance(exc, errors.InvalidForm):
        return [
            schemas.ErrorDetail(
                field=str(e.get("field") or ""),
                message=str(e.get("message") or ""),
                type=None if e.get("type") is None else str(e.get("type")),
            )
            for e in exc.errors
        ]
    if isinstance(exc, errors.InvalidInput):
        return [
            schemas.ErrorDetail(
                field=".".join(str(p) for p in e.get("loc", ())),
                message=str(e.get("msg") or ""),
                type=None if e.get("type") is None else str(e.get("type")),
            )
            for e in exc.errors
        ]
    return None


def _json(body: schemas.ErrorBody, status: int, headers: Mapping[str, str] | None = None) -> Any:
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


async def flowdesk_error(request: Request, exc: Exception) -> JSONResponse:
    """The one mapping of flowdesk errors to HTTP."""
    assert isinstance(exc, errors.FlowdeskError)
    status = status_of(exc)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    body = schemas.ErrorBody(error=type(exc).__name__, message=exc.message, errors=_details(exc))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response: JSONResponse = _json(body, status, headers)
    return response


async def request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own validation of paths, queries, headers and bodies, in our error body."""
    assert isinstance(exc, RequestValidationError)
    details = [
        schemas.ErrorDetail(
            field=".".join(str(p) for p in e.get("loc", ())),
            message=str(e.get("msg", "")),
            type=str(e.get("type", "")) or None,
        )
        for e in exc.errors()
    ]
    summary = "; ".join(f"{d.field or '(request)'}: {d.message}" for d in details[:5])
    body = schemas.ErrorBody(
        error="InvalidRequest", message=f"Invalid request: {summary}", errors=details
    )
    response: JSONResponse = _json(body, 422)
    return response


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown paths, wrong methods and the like, in our error body."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # a body that is not even text (FastAPI's own check)
        body = schemas.ErrorBody(error="InvalidRequest", message=f"Invalid request: {exc.detail}")
        invalid: JSONResponse = _json(body, 422)
        return invalid
    names = {404: "NotFound", 405: "MethodNotAllowed"}
    body = schemas.ErrorBody(error=names.get(exc.status_code, "HTTPError"), message=exc.detail)
    response: JSONResponse = _json(body, exc.status_code, exc.headers)
    return response


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = schemas.ErrorBody(error="InternalError", message="Internal server error.")
    response: JSONResponse = _json(body, 500)
    return response


def create_app(
    app: App,
    *,
    audit: audit_log.AuditLog | None = None,
    worker: bool = False,
    metrics_access: str = "local",
    documents: archive_mod.Archive | None = None,
    session_key: str | bytes | None = None,
    session_lifetime: timedelta = timedelta(hours=8),
    signin_limits: throttle.Limits | None = None,
) -> FastAPI:
    """The REST API of ``app``, and the web UI under ``/ui`` (``/`` leads there).

    The customer support chat is under ``/chat`` (`flowdesk.server.ui.chat`).

    The server opens ``app`` when it starts and closes it when it stops. With ``worker``,
    it also runs a worker in the same process for its whole life, and that worker signs
    audit checkpoints (`AuditLog.install`). ``audit`` defaults to ``AuditLog(app)``.
    It instruments ``app`` (`flowdesk.observe.instrument`) and serves ``GET /metrics``
    to whom ``metrics_access`` lets in (`flowdesk.server.metrics`).

    ``documents`` is the archive the web UI previews tasks' source documents from;
    ``session_key`` signs its session cookies (default ``$FLOWDESK_SESSION_KEY``, else a
    random key per process: see `flowdesk.server.ui.auth`), whose sessions last
    ``session_lifetime``. ``signin_limits`` says when failed sign-ins lock an account or a
    client address out (default `flowdesk.server.ui.throttle.Limits()`: 5 failures of an
    account or 20 from an address within 15 minutes; lockouts of 30 s, doubling up to 15
    minutes).
    """
    audit = audit or audit_log.AuditLog(app)
    access = metrics_routes.check_access(metrics_access)
    observe.instrument(app)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await app.open()
        try:
            if not worker:
                yield
                return
            before = list(app.upkeep_hooks)
            audit.install()
            added = [h for h in app.upkeep_hooks if h not in before]
            try:
                async with app.worker():
                    yield
            finally:
                for hook in added:
                    app.upkeep_hooks.remove(hook)
        finally:
            await app.close()

    api_app = FastAPI(
        title="flowdesk",
        version=flowdesk.__version__,
        description=(
            "Durable workflows with human tasks and an audit chain. Authenticate with "
            "`Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
    )
    services = api.Services(
        app=app, identity=ident.Identity(app), inbox=inbox_mod.Inbox(app), audit=audit
    )
    api_app.state.flowdesk = services
    api_app.add_exception_handler(errors.FlowdeskError, flowdesk_error)
    api_app.add_exception_handler(RequestValidationError, request_invalid)
    api_app.add_exception_handler(StarletteHTTPException, http_error)
    api_app.add_exception_handler(Exception, unexpected)
    api_app.include_router(api.router)
    api_app.include_router(hooks.router)
    api_app.include_router(assistant_routes.router)
    api_app.include_router(metrics_routes.router)
    api_app.state.metrics_access = access

    @api_app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse(web_ui.PREFIX + "/", status_code=307)

    api_app.mount(
        web_ui.PREFIX,
        web_ui.create_ui(
            services,
            documents=documents,
            session_key=session_key,
            session_lifetime=session_lifetime,
            signin_limits=signin_limits,
        ),
        name="ui",
    )
    api_app.mount(chat_ui.PREFIX, chat_ui.create_chat(services), name="chat")
    api_app.add_middleware(observe.logs.RequestContext)
    return api_app


def serve(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker: bool = True,
    audit: audit_log.AuditLog | None = None,
    log_level: str = "info",
    metrics_access: str = "local",
    log_config: dict[str, Any] | None = uvicorn.config.LOGGING_CONFIG,
    documents: archive_mod.Archive | None = None,
) -> None:
    """Serve the REST API of ``app`` (with an embedded worker unless ``worker=False``) until
    interrupted (Ctrl-C or SIGTERM: the worker finishes in-flight work, then stops).
    ``log_config=None`` leaves uvicorn's loggers to the root logger's handlers (as
    `flowdesk.observe.logs.configure` set them)."""
    uvicorn.run(
        create_app(
            app, audit=audit, worker=worker, metrics_access=metrics_access, documents=documents
        ),
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
    )
