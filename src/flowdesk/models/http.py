"""Providers that call a model over HTTP (with httpx), whole or streamed (SSE).

* `OpenAIProvider` speaks the OpenAI-compatible API (``POST {base_url}/chat/completions``
  and ``POST {base_url}/embeddings``) that OpenAI and most self-hosted servers (vLLM,
  llama.cpp, Ollama) answer.
* `AnthropicProvider` speaks the Anthropic Messages API (``POST {base_url}/v1/messages``).

Both classify with a generative model the same way: the system prompt lists the allowed
labels and asks for exactly one JSON object ``{"label": ..., "confidence": ...}``; the
reply is parsed strictly (one JSON object, optionally in one markdown code fence, a label
from the list, a confidence between 0 and 1, no other keys than ``reason``), and anything
else is a `BadModelAnswer`. Confidence comes from token log-probabilities when the
server returns them (OpenAI-compatible with ``logprobs = true``: the probability of the
tokens that spell the label), else from the model's own report in the JSON. The
Anthropic API returns no log-probabilities, so its confidence is always self-reported.

Structured output (``ModelRequest.schema``): the OpenAI-compatible provider sends the JSON
Schema as ``response_format`` (``{"type": "json_schema", ...}`` as OpenAI and vLLM take
it, or ``{"type": "json_object", "schema": ...}`` as llama.cpp's server does:
``structured_output`` in the provider's config); the Anthropic provider defines one tool
whose ``input_schema`` is the schema and makes the model call it, and the tool's input is
the answer. Both also put the schema in the system prompt. The gateway validates.

Streaming (`stream`): both read server-sent events (``stream: true``) and yield the text
as it comes, then the whole result with the usage the server reported (OpenAI-compatible
servers are asked for it with ``stream_options.include_usage``; one that does not send
it gets the pieces counted as output tokens and the prompt estimated at 4 characters a
token). An ``error`` event in the stream is translated like a status.

Errors are translated at this seam, keeping the cause: timeouts, connection errors, 408,
429 and 5xx become `ProviderUnavailable` (with the server's ``Retry-After`` in seconds,
which the gateway honours up to the provider's ``max_retry_after_s``); other 4xx become
`ModelError`; a body that is not the API's JSON becomes `BadModelAnswer`. Messages name
the provider and status, never the prompt.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx

from flowdesk import errors
from flowdesk.models import base

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n\s*```$", re.DOTALL)
_ALLOWED_KEYS = frozenset({"label", "confidence", "reason"})


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def structured_prompt(instructions: str | None, schema: Mapping[str, Any]) -> str:
    """The system prompt for an answer that must follow a JSON Schema."""
    lines = [instructions.strip()] if instructions else []
    lines.append(
        "Answer with exactly one JSON object that follows this JSON Schema, and nothing "
        "else: " + json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    )
    return "\n".join(lines)


def system_prompt(request: base.ModelRequest, *, grammar: bool = False) -> str | None:
    """The system prompt for ``request``: the task's instructions, with the labels of a
    classification or the schema of a structured answer. With ``grammar`` (the provider
    constrains the output to the schema itself) only the schema's field names are given,
    which keeps the prompt, and the time a small local model spends reading it, short."""
    system: str | None = request.hints.get("system")
    if request.capability == "classify":
        return classify_prompt(system, request.labels)
    if request.schema is not None:
        if grammar:
            fields = list((request.schema.get("properties") or {}).keys())
            lines = [system.strip()] if system else []
            lines.append(
                "Answer with one JSON object"
                + (f" with the fields {', '.join(fields)}." if fields else ".")
            )
            return "\n".join(lines)
        return structured_prompt(system, request.schema)
    return system


def sse_events(lines: Sequence[str]) -> list[tuple[str | None, str]]:
    """(event, data) for each complete event in ``lines`` (server-sent events)."""
    events: list[tuple[str | None, str]] = []
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if data:
        events.append((event, "\n".join(data)))
    return events


def classify_prompt(instructions: str | None, labels: Sequence[str]) -> str:
    """The system prompt for classifying with a generative model."""
    lines = [instructions.strip()] if instructions else []
    lines.append(
        "Answer with exactly one JSON object and nothing else: "
        '{"label": <one of the allowed labels>, "confidence": <your probability, from 0 to '
        "1, that the label is right>}."
    )
    lines.append("Allowed labels: " + json.dumps(list(labels), ensure_ascii=False))
    return "\n".join(lines)


def parse_classification(
    content: str,
    labels: Sequence[str],
    *,
    where: str,
    confidence_of: Callable[[str], float | None] | None = None,
) -> tuple[str, float]:
    """(label, confidence) from a model's reply, or `BadModelAnswer` saying what is wrong.

    ``confidence_of(label)`` gives the confidence from log-probabilities when it can; a
    self-reported ``confidence`` is then optional (but still checked when present)."""
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except ValueError:
        raise errors.BadModelAnswer(f"{where}: the reply is not one JSON object.") from None
    if not isinstance(data, dict):
        raise errors.BadModelAnswer(f"{where}: the reply is JSON but not an object.")
    extra = sorted(set(data) - _ALLOWED_KEYS)
    if extra:
        raise errors.BadModelAnswer(f"{where}: unexpected keys {extra} in the reply.")
    label = data.get("label")
    if not isinstance(label, str) or label not in labels:
        raise errors.BadModelAnswer(
            f"{where}: the label is not one of the allowed labels {list(labels)}."
        )
    measured = confidence_of(label) if confidence_of is not None else None
    reported = data.get("confidence")
    if reported is None and measured is not None:
        return label, measured
    if (
        isinstance(reported, bool)
        or not isinstance(reported, int | float)
        or not 0.0 <= float(reported) <= 1.0
    ):
        raise errors.BadModelAnswer(f"{where}: confidence must be a number from 0 to 1.")
    return label, float(reported) if measured is None else measured


def label_logprob_confidence(content: str, label: str, tokens: Any) -> float | None:
    """The probability of the tokens spelling the label's value in ``content``, from an
    OpenAI ``logprobs.content`` list; None when the tokens do not line up with the text."""
    if not isinstance(tokens, list) or not tokens:
        return None
    try:
        pieces = [(str(t["token"]), float(t["logprob"])) for t in tokens]
    except (KeyError, TypeError, ValueError):
        return None
    if "".join(p for p, _ in pieces) != content:
        return None
    key = content.find('"label"')
    start = content.find(json.dumps(label, ensure_ascii=False), key + 7 if key >= 0 else 0)
    if key < 0 or start < 0:
        return None
    start += 1  # inside the quotes
    end = start + len(label)
    total, pos = 0.0, 0
    for piece, logprob in pieces:
        nxt = pos + len(piece)
        if nxt > start and pos < end:
            total += logprob
        pos = nxt
    return min(1.0, math.exp(total))


class HttpProvider(base.Provider):
    """What the two wire protocols share: one pooled httpx client, error translation."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        external: bool = True,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.external = external
        self._api_key = api_key
        self.timeout = timeout
        self._headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _client_for_loop(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(
                headers={**self._headers, **self._auth_headers()},
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
            self._loop = loop
        return self._client

    def _transport_error(self, exc: httpx.HTTPError, timeout: float | None) -> errors.ModelError:
        if isinstance(exc, httpx.TimeoutException):
            return errors.ProviderUnavailable(
                f"Provider {self.name!r}: no answer within {timeout or self.timeout:g} s."
            )
        return errors.ProviderUnavailable(
            f"Provider {self.name!r}: cannot reach {self.base_url}: {type(exc).__name__}."
        )

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None) -> Any:
        client = self._client_for_loop()
        url = self.base_url + path
        try:
            response = await client.post(url, json=body, timeout=timeout or self.timeout)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, timeout) from exc
        self._check_status(response)
        try:
            return response.json()
        except ValueError:
            raise errors.BadModelAnswer(
                f"Provider {self.name!r} answered {response.status_code} with a body that is "
                "not JSON."
            ) from None

    async def _events(
        self, path: str, body: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[tuple[str | None, Any]]:
        """POST ``body`` and yield each server-sent event as (event name, parsed data);
        ``data: [DONE]`` ends the stream."""
        client = self._client_for_loop()
        url = self.base_url + path
        try:
            async with client.stream(
                "POST", url, json=body, timeout=timeout or self.timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check_status(response)
                pending: list[str] = []
                async for line in response.aiter_lines():
                    pending.append(line)
                    if line:
                        continue
                    for event, data in sse_events(pending):
                        if data.strip() == "[DONE]":
                            return
                        try:
                            yield event, json.loads(data)
                        except ValueError:
                            raise self._bad("a streamed event is not JSON.") from None
                    pending = []
                for event, data in sse_events(pending):
                    if data.strip() == "[DONE]":
                        return
                    try:
                        yield event, json.loads(data)
                    except ValueError:
                        raise self._bad("a streamed event is not JSON.") from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, timeout) from exc

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 408 or status == 429 or status >= 500:
            raise errors.ProviderUnavailable(
                f"Provider {self.name!r} answered {status}{self._error_detail(response)}.",
                retry_after=retry_after_seconds(response.headers),
            )
        if status >= 400:
            hint = " Check its API key." if status in (401, 403) else ""
            raise errors.ModelError(
                f"Provider {self.name!r} refused the call ({status}"
                f"{self._error_detail(response)}).{hint}"
            )

    @staticmethod
    def _error_detail(response: httpx.Response) -> str:
        """The API's own error type, when the body names one (never the prompt)."""
        try:
            data = response.json()
        except ValueError:
            return ""
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            kind = err.get("type") or err.get("code")
            if isinstance(kind, str) and len(kind) <= 60:
                return f": {kind}"
        return ""

    def _bad(self, what: str) -> errors.BadModelAnswer:
        return errors.BadModelAnswer(f"Provider {self.name!r}: {what}")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _tokens(usage: Any, key_in: str, key_out: str) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    t_in, t_out = usage.get(key_in, 0), usage.get(key_out, 0)
    return (t_in if isinstance(t_in, int) else 0, t_out if isinstance(t_out, int) else 0)


class OpenAIProvider(HttpProvider):
    """OpenAI-compatible chat completions (classify, generate) and embeddings (embed)."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        external: bool = True,
        logprobs: bool = True,
        structured_output: str = "json_schema",
    ) -> None:
        super().__init__(
            name,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            headers=headers,
            external=external,
        )
        self.logprobs = logprobs
        if structured_output not in ("json_schema", "json_object"):
            raise errors.ConfigurationError(
                f"Provider {name!r}: structured_output must be 'json_schema' or 'json_object'."
            )
        self.structured_output = structured_output

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _chat_body(self, request: base.ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages(system_prompt(request)),
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        temperature = request.hints.get("temperature")
        if temperature is None and request.capability == "classify":
            temperature = 0
        if temperature is not None:
            body["temperature"] = temperature
        if request.capability == "classify" and self.logprobs:
            body["logprobs"] = True
        if request.schema is not None:
            if self.structured_output == "json_object":
                body["response_format"] = {"type": "json_object", "schema": request.schema}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": request.schema_name, "schema": request.schema},
                }
        return body

    async def stream(self, request: base.ModelRequest) -> AsyncIterator[base.StreamPart]:
        if request.capability != "generate":
            async for part in super().stream(request):
                yield part
            return
        body = self._chat_body(request)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        pieces: list[str] = []
        model = request.model
        usage: Any = None
        async for _, data in self._events("/chat/completions", body, request.timeout):
            if not isinstance(data, dict):
                raise self._bad("a streamed event is not a JSON object.")
            if isinstance(data.get("error"), dict):
                raise errors.ProviderUnavailable(
                    f"Provider {self.name!r} failed mid-stream{self._event_error(data)}."
                )
            if isinstance(data.get("model"), str):
                model = data["model"]
            if isinstance(data.get("usage"), dict):
                usage = data["usage"]
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                continue
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                pieces.append(content)
                yield content
        text = "".join(pieces)
        tokens_in, tokens_out = _tokens(usage, "prompt_tokens", "completion_tokens")
        if usage is None:  # the server reports no usage: count and estimate
            tokens_out = len(pieces)
            prompt = "".join(m["content"] for m in body["messages"])
            tokens_in = math.ceil(len(prompt) / 4)
        yield base.ProviderResult(
            model=model,
            version=request.version or model,
            text=text,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    @staticmethod
    def _event_error(data: dict[str, Any]) -> str:
        kind = data["error"].get("type") or data["error"].get("code")
        return f": {kind}" if isinstance(kind, str) and len(kind) <= 60 else ""

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        if request.capability == "embed":
            return await self._embed(request)
        body = self._chat_body(request)
        data = await self._post("/chat/completions", body, request.timeout)
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("the reply has no choices[0].message.content.") from None
        if not isinstance(content, str):
            raise self._bad("choices[0].message.content is not text.")
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        tokens_in, tokens_out = _tokens(data.get("usage"), "prompt_tokens", "completion_tokens")
        result = base.ProviderResult(
            model=model,
            version=request.version or model,
            text=content,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
        if request.capability != "classify":
            return result
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        label, confidence = parse_classification(
            content,
            request.labels,
            where=f"Provider {self.name!r}",
            confidence_of=lambda label: label_logprob_confidence(content, label, tokens),
        )
        return base.ProviderResult(
            model=model,
            version=request.version or model,
            label=label,
            confidence=confidence,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    async def _embed(self, request: base.ModelRequest) -> base.ProviderResult:
        data = await self._post(
            "/embeddings", {"model": request.model, "input": request.text}, request.timeout
        )
        try:
            vector = data["data"][0]["embedding"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("the reply has no data[0].embedding.") from None
        if not isinstance(vector, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vector
        ):
            raise self._bad("data[0].embedding is not a list of numbers.")
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        tokens_in, _ = _tokens(data.get("usage"), "prompt_tokens", "completion_tokens")
        return base.ProviderResult(
            model=model,
            version=request.version or model,
            embedding=[float(x) for x in vector],
            tokens_in=tokens_in,
        )


class AnthropicProvider(HttpProvider):
    """The Anthropic Messages API (classify, generate; it has no embeddings)."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        external: bool = True,
        anthropic_version: str = "2023-06-01",
        default_max_tokens: int = 1024,
    ) -> None:
        super().__init__(
            name,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            headers=headers,
            external=external,
        )
        self.anthropic_version = anthropic_version
        self.default_max_tokens = default_max_tokens

    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.anthropic_version}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _messages_body(self, request: base.ModelRequest) -> dict[str, Any]:
        if request.capability == "embed":
            raise errors.ModelError(f"Provider {self.name!r}: the Anthropic API has no embeddings.")
        system = system_prompt(request)
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": request.messages(None),
        }
        if system:
            body["system"] = system
        temperature = request.hints.get("temperature")
        if temperature is None and request.capability == "classify":
            temperature = 0
        if temperature is not None:
            body["temperature"] = temperature
        if request.schema is not None:
            # The answer is the input of the one tool the model must call.
            body["tools"] = [
                {
                    "name": request.schema_name,
                    "description": "Record the answer, following the schema exactly.",
                    "input_schema": request.schema,
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": request.schema_name}
        return body

    async def stream(self, request: base.ModelRequest) -> AsyncIterator[base.StreamPart]:
        if request.capability != "generate":
            async for part in super().stream(request):
                yield part
            return
        body = self._messages_body(request)
        body["stream"] = True
        pieces: list[str] = []
        model = request.model
        tokens_in = tokens_out = 0
        stopped = False
        async for event, data in self._events("/v1/messages", body, request.timeout):
            if not isinstance(data, dict):
                raise self._bad("a streamed event is not a JSON object.")
            kind = data.get("type", event)
            if kind == "error":
                err = data.get("error") if isinstance(data.get("error"), dict) else {}
                name = err.get("type") if isinstance(err, dict) else None
                detail = f": {name}" if isinstance(name, str) and len(name) <= 60 else ""
                raise errors.ProviderUnavailable(
                    f"Provider {self.name!r} failed mid-stream{detail}."
                )
            if kind == "message_start" and isinstance(data.get("message"), dict):
                message = data["message"]
                if isinstance(message.get("model"), str):
                    model = message["model"]
                tokens_in, tokens_out = _tokens(
                    message.get("usage"), "input_tokens", "output_tokens"
                )
            elif kind == "content_block_delta" and isinstance(data.get("delta"), dict):
                delta = data["delta"]
                piece = delta.get("text") if delta.get("type") == "text_delta" else None
                if delta.get("type") == "input_json_delta":
                    piece = delta.get("partial_json")
                if isinstance(piece, str) and piece:
                    pieces.append(piece)
                    yield piece
            elif kind == "message_delta":
                _, out = _tokens(data.get("usage"), "input_tokens", "output_tokens")
                tokens_out = out or tokens_out
            elif kind == "message_stop":
                stopped = True
        if not stopped:
            raise errors.ProviderUnavailable(
                f"Provider {self.name!r}: the stream ended before message_stop."
            )
        yield base.ProviderResult(
            model=model,
            version=request.version or model,
            text="".join(pieces),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        body = self._messages_body(request)
        data = await self._post("/v1/messages", body, request.timeout)
        blocks = data.get("content") if isinstance(data, dict) else None
        if not isinstance(blocks, list):
            raise self._bad("the reply has no content blocks.")
        if request.schema is not None:
            inputs = [
                b.get("input")
                for b in blocks
                if isinstance(b, dict)
                and b.get("type") == "tool_use"
                and b.get("name") == request.schema_name
            ]
            texts = [json.dumps(i, ensure_ascii=False) for i in inputs if isinstance(i, dict)]
        else:
            texts = [
                b["text"]
                for b in blocks
                if isinstance(b, dict)
                and b.get("type") == "text"
                and isinstance(b.get("text"), str)
            ]
        if not texts:
            raise self._bad(
                "the reply has no text block."
                if request.schema is None
                else f"the reply does not call the tool {request.schema_name!r}."
            )
        content = "".join(texts)
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        tokens_in, tokens_out = _tokens(data.get("usage"), "input_tokens", "output_tokens")
        if request.capability != "classify":
            return base.ProviderResult(
                model=model,
                version=request.version or model,
                text=content,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
            )
        label, confidence = parse_classification(
            content, request.labels, where=f"Provider {self.name!r}"
        )
        return base.ProviderResult(
            model=model,
            version=request.version or model,
            label=label,
            confidence=confidence,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
