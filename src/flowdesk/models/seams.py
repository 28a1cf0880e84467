"""The gateway's seams: what interceptors, version policies and observers receive and
return (each takes one frozen input dataclass), and the default version policy.
`flowdesk.models.gateway` re-exports every name here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from flowdesk.models import base
from flowdesk.models import config as cfg

if TYPE_CHECKING:
    from flowdesk.models.streaming import StreamSink


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCall:
    """One call to one model, as interceptors see it. ``request.text`` is what the
    provider reads (already redacted for an external provider)."""

    task: str
    model: str  # the model's name in the config
    provider: str
    external: bool
    request: base.ModelRequest
    estimated_cost_usd: float
    spec: cfg.ModelConfig  # the model's config: prices, versions
    run_id: str | None = None
    seq: int | None = None
    workflow: str | None = None
    canary: bool = False
    shadow: bool = False
    sink: StreamSink | None = None  # set when the caller streams the answer


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOutcome:
    """What one model call produced: the provider's result, how long the call took
    (retries included), what it cost, and how many attempts it needed."""

    result: base.ProviderResult
    latency_ms: float
    cost_usd: float
    attempts: int


CallNext = Callable[[ModelCall], Awaitable[CallOutcome]]


class Interceptor(Protocol):
    """Wraps every provider call: do something before ``next(call)``, after it, or
    instead of it (raise `BudgetExceeded` to refuse)."""

    async def __call__(self, call: ModelCall, next: CallNext) -> CallOutcome: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionQuery:
    """Which version of ``model`` should answer this call? ``key`` is the routing key
    (the ``key`` hint, else the run id, else a digest of the input): sticky choices hash it."""

    task: str
    model: str
    spec: cfg.ModelConfig
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionChoice:
    version: str
    canary: bool = False
    shadow_version: str | None = None


class VersionPolicy(Protocol):
    async def choose(self, query: VersionQuery) -> VersionChoice: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerEvent:
    """Given to observers after each answer. ``text`` is the caller's input as given (it
    may hold personal data: redact before storing it)."""

    task: str
    text: str
    answer: base.Answer
    run_id: str | None
    workflow: str | None


AnswerObserver = Callable[[AnswerEvent], Awaitable[None]]


def sticky_percent(*parts: str) -> float:
    """A stable number in [0, 100) for these parts (the same key always lands the same)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


class ConfiguredVersions:
    """The default version policy: the model's ``version``; its ``canary_version`` for
    ``canary_percent`` of routing keys (sticky); ``shadow_version`` answered beside."""

    async def choose(self, query: VersionQuery) -> VersionChoice:
        spec = query.spec
        if spec.canary_version and spec.canary_percent > 0:
            if sticky_percent(query.task, query.model, query.key) < spec.canary_percent:
                return VersionChoice(
                    version=spec.canary_version, canary=True, shadow_version=spec.shadow_version
                )
        return VersionChoice(version=spec.current_version, shadow_version=spec.shadow_version)
