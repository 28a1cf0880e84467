"""Structured logs (standard library ``logging``): every line says which run, step and
actor it belongs to.

While a run executes, the run's context variables name it (``flowdesk.observe``
binds them at the start of each execution segment, in the run's own task, so they follow
the workflow into its steps, step threads and the tasks it starts); while the API
handles a request, `RequestContext` names the request. Each line then carries:

* ``run_id``, ``workflow``, ``seq`` and ``step`` (the step running, else the latest call
  the workflow made) and ``worker``, within a run;
* ``request_id``, ``method``, ``path`` (and ``run_id`` for a ``/runs/<id>`` path),
  within a request;
* ``actor``, always: the acting user of the request, or ``system``.

`configure` sets the root logger up: ``"json"`` writes one JSON object per line
(``time``, ``level``, ``logger``, ``message``, the fields above, ``exception``),
``"text"`` the classic line with the fields in brackets.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Literal

from flowdesk import errors
from flowdesk.engine import context as context_mod
from flowdesk.store import audit

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "RequestContext",
    "TextFormatter",
    "configure",
    "fields",
]

LogFormat = Literal["json", "text"]
FORMATS: tuple[LogFormat, ...] = ("json", "text")
_RUN_PATH = re.compile(r"^/runs/([^/]+)")
_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_HANDLER = "flowdesk.observe.logs"  # the name of the handler `configure` installs


@dataclass(frozen=True, slots=True)
class RunScope:
    context: context_mod.Context
    worker_id: str


@dataclass(frozen=True, slots=True)
class RequestScope:
    request_id: str
    method: str
    path: str
    run_id: str | None


_run: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar(
    "flowdesk_log_run", default=None
)
_request: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "flowdesk_log_request", default=None
)


def bind_run(context: context_mod.Context, worker_id: str) -> contextvars.Token[RunScope | None]:
    """Name the run executing in this context (a run's task) on every line it logs."""
    return _run.set(RunScope(context, worker_id))


def unbind_run(token: contextvars.Token[RunScope | None]) -> None:
    _run.reset(token)


def fields() -> dict[str, Any]:
    """The context of a line logged here and now."""
    out: dict[str, Any] = {}
    run = _run.get()
    if run is not None:
        ctx = run.context
        seq, step = ctx.position
        out.update(
            run_id=ctx.run_id, workflow=ctx.workflow, seq=seq, step=step, worker=run.worker_id
        )
    request = _request.get()
    if request is not None:
        out.update(request_id=request.request_id, method=request.method, path=request.path)
        if request.run_id is not None:
            out.setdefault("run_id", request.run_id)
    out["actor"] = audit.ACTOR.get()
    return out


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, "flowdesk", None)
    return found if isinstance(found, dict) else fields()


class ContextFilter(logging.Filter):
    """Captures the context onto each record when it is logged (``record.flowdesk``), so
    a handler that formats later, in another thread, still knows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "flowdesk", None), dict):
            record.flowdesk = fields()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_of(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, then the context in brackets when there is a run or request."""

    def __init__(self, fmt: str = _TEXT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = _context_of(record)
        if len(ctx) == 1:  # only the actor: no run, no request
            return line
        keys = ("run_id", "seq", "step", "request_id", "actor")
        extra = " ".join(f"{k}={ctx[k]}" for k in keys if ctx.get(k) is not None)
        head, sep, rest = line.partition("\n")  # keep a traceback below the bracket
        return f"{head} [{extra}]{sep}{rest}"


def configure(
    format: str = "text", level: str | int | None = None, stream: IO[str] | None = None
) -> logging.Handler | None:
    """Send every log line to ``stream`` (stderr) in ``format`` (``json`` or ``text``) at
    ``level`` (default ``$FLOWDESK_LOG_LEVEL``, else INFO), through a handler on the root
    logger that replaces the one an earlier call added. Like `logging.basicConfig`, it
    leaves a root logger that something else already configured alone (returns None)."""
    if format not in FORMATS:
        raise errors.ConfigurationError(f"Unknown log format {format!r}: use json or text.")
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == _HANDLER]
    if len(ours) != len(root.handlers):
        return None
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name(_HANDLER)
    for old in ours:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("FLOWDESK_LOG_LEVEL", "INFO"))
    return handler


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestContext:
    """ASGI middleware: names the request (``X-Request-ID``, else a new id; method; path)
    on every line logged while it is handled, and echoes the id in ``X-Request-ID``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        request_id = given if re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", given) else uuid.uuid4().hex
        path = str(scope.get("path", ""))
        match = _RUN_PATH.match(path)
        token = _request.set(
            RequestScope(
                request_id, str(scope.get("method", "")), path, match[1] if match else None
            )
        )
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request.reset(token)
