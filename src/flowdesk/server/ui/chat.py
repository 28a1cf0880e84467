"""The customer-facing support chat, served under ``/chat`` with no staff sign-in.

``POST /chat/start`` opens a conversation: it makes an unguessable token
(`flowdesk.assistants.chat.new_token`), starts the thread's durable support conversation
and keeps the token in an HTTP-only, same-site cookie scoped to ``/chat`` (never in a URL,
so it stays out of access logs and referrers). ``GET /chat/`` shows the conversation;
``POST /chat/messages`` sends a message (it signals the conversation:
`flowdesk.assistants.support.Support.receive`); ``GET /chat/transcript`` is the transcript
as an HTML fragment the page polls (204 while nothing changed since ``?since=``), and
``GET /chat/transcript.json`` the same as JSON. ``GET /chat/stream`` is a server-sent event
stream of a reply being drafted by a language model (events ``draft``, a JSON string of
new text, and ``restart``, the text so far is void), when the assistant has a
``draft_task`` (`flowdesk.assistants.drafts`). A cookie whose token names no conversation
gets a 404. The transcript is rebuilt from the durable runs on every request
(`flowdesk.assistants.chat.transcript`), so a reload or a restarted server loses nothing.

Posted forms carry a token derived from the chat's token (``csrf``), so another site
cannot post into someone's chat even where same-site cookies are not enforced.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowdesk import errors
from flowdesk.assistants import chat as chat_mod
from flowdesk.assistants import installed
from flowdesk.assistants import support as sup
from flowdesk.server import api
from flowdesk.server.ui import pages

__all__ = ["COOKIE", "PREFIX", "create_chat"]

PREFIX = "/chat"
COOKIE = "flowdesk_chat"
MAX_MESSAGE = 4000
COOKIE_AGE = 30 * 86400
KEEP_ALIVE = 15.0  # seconds between comments on an idle event stream
UI_ROOT = "/ui"  # the stylesheet and htmx are the web UI's static files


class ChatNotFound(errors.NotFound):
    """This conversation does not exist (the link or cookie is wrong, or it was erased):
    start a new one."""


class MessageInvalid(errors.FlowdeskError):
    """The message is empty or too long."""


def _csrf(token: str) -> str:
    return hashlib.sha256(f"flowdesk-chat-form:{token}".encode()).hexdigest()[:32]


def _support(request: Request) -> sup.Support:
    services: api.Services = request.app.state.services
    return installed.support(services.app)


def _page(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = pages.templates.get_template(name).render(
        request=request, user=None, csrf=None, root=UI_ROOT, chat=PREFIX, **values
    )
    response = HTMLResponse(html, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


class Chat:
    """The conversation the request's cookie names."""

    def __init__(self, support: sup.Support, token: str, thread_id: str) -> None:
        self.support = support
        self.token = token
        self.thread_id = thread_id

    async def transcript(self) -> chat_mod.Transcript:
        found = await chat_mod.transcript(self.support, self.thread_id)
        if found is None:
            raise ChatNotFound()
        return found


async def current_chat(request: Request) -> Chat:
    token = request.cookies.get(COOKIE, "")
    thread = chat_mod.thread_of(token)
    support = _support(request)
    if thread is None or not await support.runs(thread):
        raise ChatNotFound()
    return Chat(support, token, thread)


Current = Annotated[Chat, Depends(current_chat)]


def create_chat(services: api.Services) -> FastAPI:
    """The chat pages over the same services as the REST API (the app's `Support`)."""
    web = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    web.state.services = services

    @web.get("/", response_class=HTMLResponse)
    async def home(request: Request) -> Response:
        if not request.cookies.get(COOKIE):
            _support(request)  # 404 when the app has no support assistant
            return _page(request, "chat.html", transcript=None, form_token="")
        chat = await current_chat(request)
        return _page(
            request,
            "chat.html",
            transcript=await chat.transcript(),
            form_token=_csrf(chat.token),
        )

    @web.post("/start")
    async def start(request: Request) -> Response:
        support = _support(request)
        token = chat_mod.new_token()
        thread = chat_mod.thread_of(token)
        assert thread is not None
        await support.open(thread, chat_mod.customer_of(thread))
        response = RedirectResponse(PREFIX + "/", status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_AGE,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @web.post("/messages")
    async def message(request: Request, chat: Current) -> Response:
        body = await request.body()
        if len(body) > 4 * MAX_MESSAGE + 1000:
            raise MessageInvalid(f"A message may have at most {MAX_MESSAGE} characters.")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not hmac.compare_digest(form.get("csrf", ""), _csrf(chat.token)):
            raise pages.CsrfRejected()
        text = form.get("text", "").strip()
        if not text or len(text) > MAX_MESSAGE:
            raise MessageInvalid(
                f"Write a message of 1 to {MAX_MESSAGE} characters (this one has {len(text)})."
            )
        await chat.support.receive(chat.thread_id, chat_mod.customer_of(chat.thread_id), text)
        if request.headers.get("HX-Request"):
            return _page(request, "_chat_transcript.html", transcript=await chat.transcript())
        return RedirectResponse(PREFIX + "/", status_code=303)

    @web.get("/transcript", response_class=HTMLResponse)
    async def transcript(request: Request, chat: Current, since: str = "") -> Response:
        found = await chat.transcript()
        if since and since == found.version:
            return Response(status_code=204)
        return _page(request, "_chat_transcript.html", transcript=found)

    @web.get("/stream")
    async def stream(chat: Current) -> StreamingResponse:
        drafts = chat.support.drafts
        queue = drafts.watch(chat.thread_id)  # before the response starts: nothing is missed

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        chunk = await asyncio.wait_for(queue.get(), KEEP_ALIVE)
                    except TimeoutError:
                        yield ": idle\n\n"
                        continue
                    if chunk.restart:
                        yield "event: restart\ndata: \n\n"
                    elif chunk.text:
                        yield f"event: draft\ndata: {json.dumps(chunk.text)}\n\n"
            finally:
                drafts.unwatch(chat.thread_id, queue)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @web.get("/transcript.json", response_model=chat_mod.Transcript)
    async def transcript_json(chat: Current) -> chat_mod.Transcript:
        return await chat.transcript()

    async def flowdesk_error(request: Request, exc: Exception) -> Response:
        from flowdesk.server.app import status_of  # the one mapping of errors to HTTP

        assert isinstance(exc, errors.FlowdeskError)
        status = 422 if isinstance(exc, MessageInvalid) else status_of(exc)
        if request.url.path.endswith(".json"):
            return JSONResponse(
                {"error": type(exc).__name__, "message": exc.message}, status_code=status
            )
        response = _page(
            request,
            "chat_error.html",
            status=status,
            status_code=status,
            title="Conversation not found" if status == 404 else "That did not work",
            message=exc.message,
            missing=isinstance(exc, ChatNotFound),
        )
        if isinstance(exc, ChatNotFound):
            response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _page(
            request,
            "chat_error.html",
            status=exc.status_code,
            status_code=exc.status_code,
            title="Not found" if exc.status_code == 404 else "That did not work",
            message=str(exc.detail),
            missing=False,
        )

    web.add_exception_handler(errors.FlowdeskError, flowdesk_error)
    web.add_exception_handler(StarletteHTTPException, http_error)

    @web.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'",
        )
        return response

    return web
