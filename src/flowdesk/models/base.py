"""The provider seam of the model gateway: what a model is asked, and what it answers.

Every provider (local scikit-learn classifiers, OpenAI-compatible HTTP, Anthropic
Messages, local GGUF models) implements `Provider.infer`; generative providers also
implement `Provider.stream` (text as it is written, then the whole result), and honour
``ModelRequest.schema`` (a JSON Schema the answer must follow: a grammar, a
``response_format`` or a tool definition, as the provider's API allows). The gateway
(`gateway.py`) wraps providers with routing, redaction, caching, fallbacks, rollouts,
budgets, structured-output validation, guardrails and cost accounting, and returns an
`Answer`, which `ctx.model` records as a step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

Capability = Literal["classify", "generate", "embed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRequest:
    """One call to one model. ``text`` is what the model reads (already redacted when the
    provider is external); ``hints`` carry routing facts (risk, classification, region,
    routing key) and generation options (max_tokens, temperature, system prompt)."""

    task: str
    capability: Capability
    text: str
    model: str
    version: str | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()  # allowed labels, when a generative model classifies
    max_tokens: int | None = None
    timeout: float | None = None
    # Structured output: the JSON Schema the answer must follow (``schema_name`` names it
    # for the APIs that want a name). ``previous`` and ``feedback``: the model's last
    # answer and why it was refused, for the one retry with the validation error.
    schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    previous: str | None = None
    feedback: str | None = None

    def messages(self, system: str | None) -> list[dict[str, str]]:
        """The chat messages for this request: the system prompt (when any), the text,
        and for a retry the refused answer and the correction."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.text})
        if self.previous is not None and self.feedback is not None:
            messages.append({"role": "assistant", "content": self.previous})
            messages.append({"role": "user", "content": self.feedback})
        return messages


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderResult:
    """What a provider answered. ``scores`` maps labels to probabilities when known."""

    model: str
    version: str
    label: str | None = None
    text: str | None = None
    confidence: float | None = None
    scores: dict[str, float] | None = None
    embedding: list[float] | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    raw: Any = None


StreamPart = str | ProviderResult  # a piece of text as it is written; the result comes last


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed answer. ``restart`` says the text streamed so far is void
    (a retry or a fallback model starts over); ``text`` is then empty."""

    text: str
    restart: bool = False


ChunkSink = Callable[[Chunk], Awaitable[None]]


class Provider(ABC):
    """A source of model answers. Instances are shared by every caller in the process;
    ``infer`` must be safe to call concurrently."""

    name: str
    external: bool = False  # True when data leaves this machine (redaction applies)

    @abstractmethod
    async def infer(self, request: ModelRequest) -> ProviderResult:
        """Answer the request or raise `flowdesk.errors.ModelError` (or a subclass)."""

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        """Yield the answer's text as it is written, then the whole `ProviderResult` last.
        Providers that cannot stream answer at once (this default): one piece, then the
        result. Closing the iterator early stops the generation."""
        result = await self.infer(request)
        if result.text:
            yield result.text
        yield result

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads and loaded models."""


class Answer(BaseModel):
    """The gateway's answer, as recorded in the run's history."""

    task: str
    label: str | None = None
    text: str | None = None
    confidence: float | None = None
    scores: dict[str, float] | None = None
    embedding: list[float] | None = None  # capability "embed"
    model: str
    version: str
    provider: str
    latency_ms: float
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    fallback: bool = False  # a later model in the chain answered
    canary: bool = False  # the canary version answered
    shadow: dict[str, Any] | None = None  # the shadow version's answer, when one ran
    escalate: bool = False  # confidence below the route's threshold
    data: Any = None  # with schema=: the validated answer as JSON
    redactions: dict[str, int] = Field(default_factory=dict)  # kind -> count
