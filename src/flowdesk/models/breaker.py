"""Per-provider guards: a circuit breaker and a token-bucket rate limit (in process).

A `CircuitBreaker` is *closed* while calls succeed. ``failures`` unavailability errors in
a row open it: for ``reset_s`` seconds every call is refused at once (the gateway moves
to the next model) instead of waiting for a provider that is down. Then it is
*half-open*: one trial call goes through; success closes it, failure opens it again for
another ``reset_s``. Only `ProviderUnavailable` counts as a failure: a malformed answer is
the model's fault, not a sign that the provider is down.

A `TokenBucket` holds ``burst`` tokens and refills ``rate`` per second; each provider call
takes one. A caller waits for a token up to ``max_wait`` seconds, and is refused
(`BudgetExceeded`) when the wait would be longer. It limits one process; a limit shared
by every worker plugs into the gateway's interceptors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from flowdesk import errors


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """See the module docstring. ``clock`` is a monotonic seconds clock."""

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise errors.ConfigurationError(
                f"Provider {name!r}: breaker failures must be >= 1 and reset_s > 0."
            )
        self.name = name
        self.threshold = failures
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial call is in flight
        self.opened = 0  # how many times it opened (for stats)

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def before(self) -> None:
        """Let a call through, or raise `ProviderUnavailable` while open (or while the
        half-open trial call is still out)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return
        assert self._opened_at is not None
        left = max(0.0, self.reset_s - (self._clock() - self._opened_at))
        raise errors.ProviderUnavailable(
            f"Provider {self.name!r}: circuit open after {self.threshold} failures in a row; "
            f"next trial call in {left:.1f} s.",
            retry_after=left,
        )

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        self._failures += 1
        if self._trial or self._failures >= self.threshold:
            if self._opened_at is None or self._trial:
                self.opened += 1
            self._opened_at = self._clock()
            self._trial = False

    def release(self) -> None:
        """The call ended without telling anything about the provider (cancelled, or
        refused before it was sent): a half-open trial slot is handed back."""
        self._trial = False


class TokenBucket:
    """See the module docstring. ``sleep`` is what waits (injectable for tests)."""

    def __init__(
        self,
        name: str,
        *,
        rate: float,
        burst: int | None = None,
        max_wait: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or (burst is not None and burst < 1) or max_wait < 0:
            raise errors.ConfigurationError(
                f"Provider {name!r}: rate_per_s must be > 0, burst >= 1, rate_max_wait_s >= 0."
            )
        self.name = name
        self.rate = rate
        self.capacity = float(burst if burst is not None else max(1, int(rate)))
        self.max_wait = max_wait
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        """Take a token, waiting for it up to ``max_wait``; else raise `BudgetExceeded`."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return
        wait = (1 - self._tokens) / self.rate
        if wait > self.max_wait:
            raise errors.BudgetExceeded(
                f"Provider {self.name!r}: rate limit of {self.rate:g}/s reached; the next call "
                f"could go in {wait:.2f} s, beyond rate_max_wait_s = {self.max_wait:g}."
            )
        # Reserve the token now (the balance goes negative), so concurrent callers queue
        # behind each other instead of all waking for the same token.
        self._tokens -= 1
        await self._sleep(wait)
