"""The HTTP providers against a real local server that speaks each wire protocol.

`ModelServer` is a Starlette app served by uvicorn on a free port, in a thread of its
own: ``/v1/chat/completions`` and ``/v1/embeddings`` (OpenAI-compatible) and
``/v1/messages`` (Anthropic), with real-shaped JSON, and server-sent events when a request
asks for ``stream`` (the text in 3-character pieces; Anthropic's event sequence, and an
``error`` event mid-stream when a reply says so). By default it behaves like a small
model: it classifies by the first allowed label named in the user's text, answers
generation by echoing the text, and reports token usage; a scripted ``content`` is the
answer (for Anthropic with tools, it is the JSON input of the tool call). Tests queue
scripted replies (429 with Retry-After, 5xx, slow answers, malformed bodies) and read
every request it got.
`test_gateway.py` uses the same server.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flowdesk import errors
from flowdesk.models import base, http

API_KEY = "sk-test-1234"


@dataclass
class Reply:
    """One scripted reply. ``content`` wraps text in the protocol's normal envelope;
    ``body`` is sent raw; ``delay`` waits first (then the reply, or the default)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content: str | None = None
    body: str | None = None
    json: Any = None
    delay: float = 0.0
    stream_error: bool = False  # streamed: an error event after the first pieces


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class ModelServer:
    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.requests: list[Seen] = []
        self.confidence: dict[str, float] = {}  # model -> self-reported confidence
        self.logprob_confidence: dict[str, float] = {}  # model -> confidence in logprobs
        self._scripts: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
            ]
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ModelServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the model server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(replies)

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- request handling ------------------------------------------------------------
    async def _take(self, request: Request) -> tuple[Any, Reply | None]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        with self._lock:
            self.requests.append(
                Seen(request.url.path, dict(request.headers), body, time.monotonic())
            )
            queue = self._scripts.get(request.url.path)
            reply = queue.popleft() if queue else None
        if reply is not None and reply.delay:
            # Wait, but let the server stop at once at the end of the test.
            await asyncio.get_running_loop().run_in_executor(None, self._release.wait, reply.delay)
        return body, reply

    @staticmethod
    def _scripted(reply: Reply | None, envelope: Any) -> Response | None:
        if reply is None:
            return None
        if reply.body is not None:
            return Response(reply.body, reply.status, reply.headers, "application/json")
        if reply.json is not None:
            return JSONResponse(reply.json, reply.status, reply.headers)
        if reply.status != 200:
            error = {"error": {"type": "server_error" if reply.status >= 500 else "rate_limit"}}
            return JSONResponse(error, reply.status, reply.headers)
        if reply.content is not None and not reply.stream_error:
            return JSONResponse(envelope(reply.content), 200, reply.headers)
        return None  # only a delay: answer normally

    def _classify(self, model: str, system: str, text: str) -> tuple[str, str]:
        """(content, label) as a small model would answer."""
        match = re.search(r"Allowed labels: (\[.*\])", system)
        labels: list[str] = json.loads(match.group(1)) if match else ["other"]
        label = next((lab for lab in labels if lab.casefold() in text.casefold()), labels[-1])
        confidence = self.confidence.get(model, 0.9)
        return json.dumps({"label": label, "confidence": confidence}), label

    async def _chat(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"type": "invalid_api_key"}}, 401)
        body, reply = await self._take(request)
        model = body["model"]
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        text = next(m["content"] for m in messages if m["role"] == "user")  # the first
        tokens_in = sum(len(m["content"]) for m in messages) // 4 + 1

        def envelope(content: str, logprobs: Any = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-" + hashlib.sha1(content.encode()).hexdigest()[:12],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": tokens_in,
                    "completion_tokens": len(content) // 4 + 1,
                    "total_tokens": tokens_in + len(content) // 4 + 1,
                },
            }

        if body.get("stream"):
            if reply is not None and reply.status != 200:
                return self._scripted(reply, envelope) or JSONResponse({}, 500)
            content = reply.content if reply and reply.content is not None else "Echo: " + text
            return self._openai_stream(model, content, tokens_in, body, reply)
        scripted = self._scripted(reply, envelope)
        if scripted is not None:
            return scripted
        if "Allowed labels:" not in system:
            return JSONResponse(envelope("Echo: " + text))
        content, label = self._classify(model, system, text)
        logprobs = None
        if body.get("logprobs") and model in self.logprob_confidence:
            logprobs = {
                "content": _tokens_with_logprobs(content, label, self.logprob_confidence[model])
            }
        return JSONResponse(envelope(content, logprobs))

    @staticmethod
    def _sse(events: list[tuple[str | None, Any]]) -> StreamingResponse:
        async def body() -> Any:
            for event, data in events:
                head = f"event: {event}\n" if event else ""
                payload = data if isinstance(data, str) else json.dumps(data)
                yield f"{head}data: {payload}\n\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(body(), media_type="text/event-stream")

    def _openai_stream(
        self, model: str, content: str, tokens_in: int, body: Any, reply: Reply | None
    ) -> StreamingResponse:
        pieces = [content[i : i + 3] for i in range(0, len(content), 3)]
        events: list[tuple[str | None, Any]] = []
        for n, piece in enumerate(pieces):
            if reply is not None and reply.stream_error and n == 2:
                events.append((None, {"error": {"type": "server_error", "message": "x"}}))
                return self._sse(events)
            delta = {"role": "assistant", "content": piece} if n == 0 else {"content": piece}
            chunk = {
                "id": "chatcmpl-s",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            events.append((None, chunk))
        end = {"index": 0, "delta": {}, "finish_reason": "stop"}
        events.append((None, {"id": "chatcmpl-s", "model": model, "choices": [end]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": tokens_in, "completion_tokens": len(pieces)}
            events.append(
                (None, {"id": "chatcmpl-s", "model": model, "choices": [], "usage": usage})
            )
        events.append((None, "[DONE]"))
        return self._sse(events)

    def _anthropic_stream(
        self, model: str, content: str, tokens_in: int, tool: str | None, reply: Reply | None
    ) -> StreamingResponse:
        pieces = [content[i : i + 3] for i in range(0, len(content), 3)]
        start = {
            "type": "message_start",
            "message": {
                "model": model,
                "content": [],
                "usage": {"input_tokens": tokens_in, "output_tokens": 1},
            },
        }
        block = (
            {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}
            if tool
            else {"type": "text", "text": ""}
        )
        events: list[tuple[str | None, Any]] = [
            ("message_start", start),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            ),
            ("ping", {"type": "ping"}),
        ]
        for n, piece in enumerate(pieces):
            if reply is not None and reply.stream_error and n == 2:
                events.append(("error", {"type": "error", "error": {"type": "overloaded_error"}}))
                return self._sse(events)
            delta = (
                {"type": "input_json_delta", "partial_json": piece}
                if tool
                else {"type": "text_delta", "text": piece}
            )
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": len(pieces)},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return self._sse(events)

    async def _embeddings(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"type": "invalid_api_key"}}, 401)
        body, reply = await self._take(request)
        digest = hashlib.sha256(body["input"].encode()).digest()
        vector = [round(b / 255, 4) for b in digest[:8]]
        envelope = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": body["model"],
            "usage": {"prompt_tokens": len(body["input"]) // 4 + 1, "total_tokens": 3},
        }
        scripted = self._scripted(reply, lambda _: envelope)
        return scripted or JSONResponse(envelope)

    async def _messages(self, request: Request) -> Response:
        if request.headers.get("x-api-key") != self.api_key:
            error = {"type": "error", "error": {"type": "authentication_error", "message": "x"}}
            return JSONResponse(error, 401)
        if not request.headers.get("anthropic-version"):
            return JSONResponse({"type": "error", "error": {"type": "invalid_request_error"}}, 400)
        body, reply = await self._take(request)
        if not isinstance(body.get("max_tokens"), int):
            return JSONResponse({"type": "error", "error": {"type": "invalid_request_error"}}, 400)
        model = body["model"]
        system = body.get("system", "")
        text = body["messages"][0]["content"]
        tool = body["tools"][0]["name"] if body.get("tools") else None

        def envelope(content: str) -> dict[str, Any]:
            block: dict[str, Any] = {"type": "text", "text": content}
            if tool is not None:
                block = {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": tool,
                    "input": json.loads(content),
                }
            return {
                "id": "msg_" + hashlib.sha1(content.encode()).hexdigest()[:12],
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": (len(system) + len(text)) // 4 + 1,
                    "output_tokens": len(content) // 4 + 1,
                },
            }

        if body.get("stream"):
            if reply is not None and reply.status != 200:
                return self._scripted(reply, envelope) or JSONResponse({}, 500)
            content = reply.content if reply and reply.content is not None else "Echo: " + text
            tokens_in = (len(system) + len(text)) // 4 + 1
            return self._anthropic_stream(model, content, tokens_in, tool, reply)
        scripted = self._scripted(reply, envelope)
        if scripted is not None:
            return scripted
        if "Allowed labels:" not in system:
            return JSONResponse(envelope("Echo: " + text))
        return JSONResponse(envelope(self._classify(model, system, text)[0]))


def _tokens_with_logprobs(content: str, label: str, confidence: float) -> list[dict[str, Any]]:
    """``content`` cut into 3-character tokens; the tokens that spell the label share
    log(confidence), the others are certain."""
    pieces = [content[i : i + 3] for i in range(0, len(content), 3)]
    start = content.index(json.dumps(label)) + 1
    end = start + len(label)
    spans, pos = [], 0
    for piece in pieces:
        spans.append(pos + len(piece) > start and pos < end)
        pos += len(piece)
    share = math.log(confidence) / sum(spans)
    return [
        {"token": p, "logprob": share if s else 0.0, "bytes": list(p.encode()), "top_logprobs": []}
        for p, s in zip(pieces, spans, strict=True)
    ]


@pytest.fixture
def model_server():
    server = ModelServer().start()
    yield server
    server.stop()


def openai(server: ModelServer, **kwargs: Any) -> http.OpenAIProvider:
    kwargs.setdefault("api_key", API_KEY)
    return http.OpenAIProvider("oa", base_url=server.url + "/v1", **kwargs)


def anthropic(server: ModelServer, **kwargs: Any) -> http.AnthropicProvider:
    kwargs.setdefault("api_key", API_KEY)
    return http.AnthropicProvider("an", base_url=server.url, **kwargs)


LABELS = ("billing", "technical", "other")


def classify(text: str, model: str = "gpt-test", **kwargs: Any) -> base.ModelRequest:
    return base.ModelRequest(
        task="ticket",
        capability="classify",
        text=text,
        model=model,
        version=kwargs.pop("version", "v1"),
        labels=LABELS,
        hints={"system": "Classify the ticket."},
        **kwargs,
    )


def generate(text: str, model: str = "gpt-test") -> base.ModelRequest:
    return base.ModelRequest(
        task="reply", capability="generate", text=text, model=model, max_tokens=50
    )


# -- OpenAI-compatible ---------------------------------------------------------------------


async def test_openai_classifies_with_the_labels_in_the_prompt_and_parses_strictly(model_server):
    model_server.confidence["gpt-test"] = 0.83
    provider = openai(model_server, logprobs=False)
    try:
        result = await provider.infer(classify("My invoice shows a billing error"))
    finally:
        await provider.close()
    assert (result.label, result.confidence) == ("billing", 0.83)
    assert (result.model, result.version) == ("gpt-test", "v1")
    assert result.tokens_in > 0 and result.tokens_out > 0
    [seen] = model_server.seen("/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    body = seen.body
    assert body["model"] == "gpt-test" and body["temperature"] == 0
    assert "logprobs" not in body
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Classify the ticket.")
    assert 'Allowed labels: ["billing", "technical", "other"]' in system["content"]
    assert body["messages"][1] == {"role": "user", "content": "My invoice shows a billing error"}


async def test_openai_confidence_comes_from_logprobs_when_the_server_returns_them(model_server):
    model_server.confidence["gpt-test"] = 0.99  # what the model says of itself
    model_server.logprob_confidence["gpt-test"] = 0.6  # what its token probabilities say
    provider = openai(model_server)
    try:
        result = await provider.infer(classify("technical problem with login"))
    finally:
        await provider.close()
    assert result.label == "technical"
    assert result.confidence == pytest.approx(0.6)
    assert model_server.seen("/v1/chat/completions")[0].body["logprobs"] is True


async def test_openai_generates_text_and_embeds(model_server):
    provider = openai(model_server)
    try:
        text = await provider.infer(generate("hello there"))
        vector = await provider.infer(
            base.ModelRequest(task="e", capability="embed", text="hello", model="emb-1")
        )
    finally:
        await provider.close()
    assert text.text == "Echo: hello there" and text.label is None and text.confidence is None
    assert model_server.seen("/v1/chat/completions")[0].body["max_tokens"] == 50
    assert vector.embedding is not None and len(vector.embedding) == 8
    assert vector.model == "emb-1" and vector.tokens_in == 2
    assert model_server.seen("/v1/embeddings")[0].body == {"model": "emb-1", "input": "hello"}


# -- Anthropic Messages ----------------------------------------------------------------------


async def test_anthropic_classifies_and_generates_over_the_messages_api(model_server):
    model_server.confidence["claude-test"] = 0.77
    provider = anthropic(model_server)
    try:
        result = await provider.infer(classify("billing question", model="claude-test"))
        text = await provider.infer(generate("hi", model="claude-test"))
    finally:
        await provider.close()
    assert (result.label, result.confidence) == ("billing", 0.77)
    assert result.tokens_in > 0 and result.tokens_out > 0
    assert text.text == "Echo: hi"
    first, second = model_server.seen("/v1/messages")
    assert first.headers["x-api-key"] == API_KEY
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert first.body["max_tokens"] == 1024  # required by the API: a default is sent
    assert "Allowed labels:" in first.body["system"]
    assert first.body["messages"] == [{"role": "user", "content": "billing question"}]
    assert second.body["max_tokens"] == 50 and "system" not in second.body


async def test_anthropic_has_no_embeddings(model_server):
    provider = anthropic(model_server)
    with pytest.raises(errors.ModelError, match="no embeddings"):
        await provider.infer(base.ModelRequest(task="e", capability="embed", text="x", model="c"))
    await provider.close()


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
async def test_429_carries_retry_after_and_5xx_is_unavailable(model_server, make):
    path = "/v1/chat/completions" if make is openai else "/v1/messages"
    model_server.script(
        path,
        Reply(status=429, headers={"Retry-After": "7"}),
        Reply(status=503),
        Reply(status=529, headers={"retry-after-ms": "1500"}),
    )
    provider = make(model_server)
    try:
        with pytest.raises(errors.ProviderUnavailable, match="429: rate_limit") as first:
            await provider.infer(classify("billing", model="m"))
        with pytest.raises(errors.ProviderUnavailable, match="503: server_error") as second:
            await provider.infer(classify("billing", model="m"))
        with pytest.raises(errors.ProviderUnavailable, match="529") as third:
            await provider.infer(classify("billing", model="m"))
    finally:
        await provider.close()
    assert first.value.retry_after == 7.0
    assert second.value.retry_after is None
    assert third.value.retry_after == 1.5


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
async def test_a_wrong_key_is_a_model_error_that_says_to_check_the_key(model_server, make):
    provider = make(model_server, api_key="wrong")
    try:
        with pytest.raises(errors.ModelError, match=r"refused the call \(401.*Check its API key"):
            await provider.infer(classify("billing", model="m"))
    finally:
        await provider.close()


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
async def test_a_slow_server_times_out_as_unavailable(model_server, make):
    path = "/v1/chat/completions" if make is openai else "/v1/messages"
    model_server.script(path, Reply(delay=5.0))
    provider = make(model_server, timeout=0.3)
    try:
        with pytest.raises(errors.ProviderUnavailable, match="no answer within 0.3 s"):
            await provider.infer(classify("billing", model="m"))
    finally:
        await provider.close()


async def test_an_unreachable_server_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nobody listens
    provider = http.OpenAIProvider("oa", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    try:
        with pytest.raises(errors.ProviderUnavailable, match="cannot reach"):
            await provider.infer(classify("billing"))
    finally:
        await provider.close()


BAD_CLASSIFICATIONS = [
    (Reply(body="{not json"), "body that is not JSON"),
    (Reply(json={"choices": []}), r"no choices\[0\]"),
    (Reply(content="I think it is billing."), "not one JSON object"),
    (Reply(content='["billing"]'), "JSON but not an object"),
    (Reply(content='{"label": "refund", "confidence": 0.9}'), "not one of the allowed labels"),
    (Reply(content='{"label": "Billing", "confidence": 0.9}'), "not one of the allowed labels"),
    (Reply(content='{"label": "billing", "confidence": 1.5}'), "confidence must be"),
    (Reply(content='{"label": "billing", "confidence": "high"}'), "confidence must be"),
    (Reply(content='{"label": "billing"}'), "confidence must be"),
    (Reply(content='{"label": "billing", "confidence": 0.9, "x": 1}'), "unexpected keys"),
]


@pytest.mark.parametrize(("reply", "message"), BAD_CLASSIFICATIONS)
async def test_an_answer_that_does_not_parse_is_a_bad_model_answer(model_server, reply, message):
    model_server.script("/v1/chat/completions", reply)
    provider = openai(model_server)
    try:
        with pytest.raises(errors.BadModelAnswer, match=message):
            await provider.infer(classify("billing"))
    finally:
        await provider.close()


async def test_a_fenced_json_answer_with_a_reason_is_accepted(model_server):
    content = '```json\n{"label": "other", "confidence": 0.4, "reason": "unclear"}\n```'
    model_server.script("/v1/messages", Reply(content=content), Reply(content="{}"))
    provider = anthropic(model_server)
    try:
        result = await provider.infer(classify("hmm"))
        with pytest.raises(errors.BadModelAnswer):
            await provider.infer(classify("hmm"))
    finally:
        await provider.close()
    assert (result.label, result.confidence) == ("other", 0.4)


def test_retry_after_is_read_as_seconds_an_http_date_or_milliseconds():
    assert http.retry_after_seconds({"retry-after": "3"}) == 3.0
    assert http.retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < (http.retry_after_seconds({"retry-after": later}) or 0) <= 120
    assert http.retry_after_seconds({"retry-after": "soon"}) is None
    assert http.retry_after_seconds({}) is None
