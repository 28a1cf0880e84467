"""Step retries: backoff, retry limits, permanent errors, per-attempt timeouts."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdesk
from flowdesk.engine.registry import RetryPolicy
from flowdesk.errors import ConfigurationError


async def _failure(app: flowdesk.App, run_id: str) -> tuple[dict[str, Any], flowdesk.Run]:
    with pytest.raises(flowdesk.RunFailed) as info:
        await app.result(run_id, timeout=15)
    return info.value.error, await app.get_run(run_id)


async def test_a_step_that_fails_twice_then_succeeds_is_retried(app, monkeypatch):
    attempts: list[int] = []
    waits: list[int] = []
    original = RetryPolicy.wait_before

    def spy(self: RetryPolicy, retry: int) -> float:
        waits.append(retry)
        return original(self, retry)

    monkeypatch.setattr(RetryPolicy, "wait_before", spy)

    @app.step(name="flaky", retries=3, retry_delay=0.01, backoff=2.0)
    async def flaky() -> str:
        info = flowdesk.current_step()
        assert info is not None
        attempts.append(info.attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    @app.workflow("retrying")
    async def retrying(ctx: flowdesk.Context) -> str:
        return await ctx.step(flaky)

    async with app, app.worker(concurrency=2):
        h = await app.start("retrying")
        assert await app.result(h.id, timeout=10) == "ok"
        steps = await app.steps(h.id)

    assert attempts == [1, 2, 3]
    assert waits == [1, 2]  # the policy was asked for the delay before each retry
    assert [(s.name, s.status, s.attempts, s.output, s.error) for s in steps] == [
        ("flaky", "ok", 3, "ok", None)
    ]


async def test_a_sync_step_is_retried_too(app):
    calls: Counter[str] = Counter()

    @app.step(name="flaky_sync", retries=2, retry_delay=0.001)
    def flaky_sync() -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError("disk busy")
        return calls["n"]

    @app.workflow("retrying_sync")
    async def retrying_sync(ctx: flowdesk.Context) -> int:
        return await ctx.step(flaky_sync)

    async with app, app.worker(concurrency=2):
        h = await app.start("retrying_sync")
        assert await app.result(h.id, timeout=10) == 3
        steps = await app.steps(h.id)
    assert steps[0].attempts == 3


async def test_exceeding_retries_fails_the_run_with_the_step_error_recorded(app):
    calls: Counter[str] = Counter()

    @app.step(name="always_down", retries=2, retry_delay=0.001, backoff=2.0)
    async def always_down() -> None:
        calls["down"] += 1
        raise ConnectionError(f"down #{calls['down']}")

    @app.step(name="never_reached")
    async def never_reached() -> None:
        calls["never"] += 1

    @app.workflow("doomed")
    async def doomed(ctx: flowdesk.Context) -> None:
        await ctx.step(always_down)
        await ctx.step(never_reached)

    async with app, app.worker(concurrency=2):
        h = await app.start("doomed")
        error, run = await _failure(app, h.id)
        steps = await app.steps(h.id)

    assert calls == {"down": 3}
    assert run.status is flowdesk.RunStatus.FAILED
    assert run.failed_seq == 1
    assert error["type"] == "StepFailed"
    assert "always_down" in error["message"] and "ConnectionError" in error["message"]
    assert "down #3" in error["message"]  # the last attempt's error
    assert len(steps) == 1
    step = steps[0]
    assert (step.name, step.status, step.attempts, step.output) == ("always_down", "error", 3, None)
    assert step.error is not None
    assert step.error["type"] == "ConnectionError"
    assert step.error["message"] == "down #3"
    assert step.error["attempts"] == 3
    assert "ConnectionError" in step.error["traceback"]


async def test_permanent_errors_are_not_retried(app):
    calls: Counter[str] = Counter()

    @app.step(name="declined", retries=5, retry_delay=0.001)
    async def declined() -> None:
        calls["declined"] += 1
        raise flowdesk.Permanent("card declined")

    @app.workflow("charge")
    async def charge(ctx: flowdesk.Context) -> None:
        await ctx.step(declined)

    async with app, app.worker(concurrency=2):
        h = await app.start("charge")
        error, _ = await _failure(app, h.id)
        steps = await app.steps(h.id)

    assert calls["declined"] == 1
    assert steps[0].attempts == 1
    assert steps[0].error is not None
    assert (steps[0].error["type"], steps[0].error["message"]) == ("Permanent", "card declined")
    assert "card declined" in error["message"]


async def test_no_retry_on_types_are_not_retried_but_others_are(app):
    calls: Counter[str] = Counter()

    class BadRequest(ValueError):
        pass

    @app.step(name="picky", retries=3, retry_delay=0.001, no_retry_on=(ValueError,))
    async def picky(kind: str) -> str:
        calls[kind] += 1
        if kind == "value":
            raise ValueError("bad value")
        if kind == "subclass":
            raise BadRequest("bad request")
        if calls[kind] < 4:
            raise KeyError("transient")
        return kind

    @app.workflow("picky_flow")
    async def picky_flow(ctx: flowdesk.Context, kind: str) -> str:
        return await ctx.step(picky, kind)

    async with app, app.worker(concurrency=4):
        value = await app.start("picky_flow", {"kind": "value"})
        subclass = await app.start("picky_flow", {"kind": "subclass"})
        other = await app.start("picky_flow", {"kind": "other"})
        value_error, _ = await _failure(app, value.id)
        subclass_error, _ = await _failure(app, subclass.id)
        assert await app.result(other.id, timeout=10) == "other"
        attempts = {h.id: (await app.steps(h.id))[0].attempts for h in (value, subclass, other)}

    assert calls == {"value": 1, "subclass": 1, "other": 4}
    assert attempts == {value.id: 1, subclass.id: 1, other.id: 4}
    assert "ValueError" in value_error["message"]
    assert "BadRequest" in subclass_error["message"]


async def test_an_async_step_past_its_timeout_is_cancelled_and_retried(app):
    calls: Counter[str] = Counter()

    @app.step(name="slow_then_fast", timeout=0.1, retries=2, retry_delay=0.001)
    async def slow_then_fast() -> str:
        calls["attempts"] += 1
        if calls["attempts"] == 1:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                calls["cancelled"] += 1
                raise
        return "fast"

    @app.workflow("timed")
    async def timed(ctx: flowdesk.Context) -> str:
        return await ctx.step(slow_then_fast)

    async with app, app.worker(concurrency=2):
        h = await app.start("timed")
        assert await app.result(h.id, timeout=10) == "fast"
        steps = await app.steps(h.id)
    assert calls == {"attempts": 2, "cancelled": 1}
    assert (steps[0].status, steps[0].attempts) == ("ok", 2)


async def test_an_async_step_that_always_times_out_fails_with_step_timeout(app):
    calls: Counter[str] = Counter()

    @app.step(name="hangs", timeout=timedelta(milliseconds=100), retries=1, retry_delay=0.001)
    async def hangs() -> None:
        calls["attempts"] += 1
        await asyncio.sleep(10)

    @app.workflow("hanging")
    async def hanging(ctx: flowdesk.Context) -> None:
        await ctx.step(hangs)

    async with app, app.worker(concurrency=2):
        h = await app.start("hanging")
        error, _ = await _failure(app, h.id)
        steps = await app.steps(h.id)

    assert calls["attempts"] == 2
    assert "StepTimeout" in error["message"]
    step = steps[0]
    assert step.error is not None
    assert (step.error["type"], step.attempts, step.error["attempts"]) == ("StepTimeout", 2, 2)
    assert "hangs" in step.error["message"] and "0.1" in step.error["message"]


async def test_a_sync_step_past_its_timeout_fails_with_step_timeout(app):
    release = threading.Event()
    calls: Counter[str] = Counter()

    @app.step(name="blocks", timeout=0.1)
    def blocks() -> str:
        calls["attempts"] += 1
        release.wait(10)
        return "late"

    @app.step(name="next_step")
    def next_step() -> None:
        calls["next"] += 1

    @app.workflow("blocking")
    async def blocking(ctx: flowdesk.Context) -> None:
        await ctx.step(blocks)
        await ctx.step(next_step)

    try:
        async with app, app.worker(concurrency=2):
            h = await app.start("blocking")
            error, run = await _failure(app, h.id)
            steps = await app.steps(h.id)
    finally:
        release.set()  # let the abandoned thread finish

    assert calls == {"attempts": 1}
    assert run.failed_seq == 1
    assert "StepTimeout" in error["message"]
    assert steps[0].error is not None
    assert (steps[0].error["type"], steps[0].attempts) == ("StepTimeout", 1)


async def test_a_step_with_many_retries_keeps_retrying_past_the_cap(app):
    # With backoff 2 the uncapped delay overflows a float after 1024 retries; the policy
    # must keep answering max_delay (here 0), not crash the run.
    calls: Counter[str] = Counter()

    @app.step(name="stubborn", retries=1_100, retry_delay=0.0, backoff=2.0, jitter=False)
    async def stubborn() -> int:
        calls["attempts"] += 1
        if calls["attempts"] <= 1_050:
            raise ConnectionError("still down")
        return calls["attempts"]

    @app.workflow("patient_retries")
    async def patient_retries(ctx: flowdesk.Context) -> int:
        return await ctx.step(stubborn)

    async with app, app.worker(concurrency=2):
        h = await app.start("patient_retries")
        assert await app.result(h.id, timeout=30) == 1_051
        steps = await app.steps(h.id)
    assert (steps[0].status, steps[0].attempts) == ("ok", 1_051)


# -- the policy itself -----------------------------------------------------------------


def test_wait_before_grows_exponentially_up_to_max_delay():
    policy = RetryPolicy(retries=10, delay=0.5, backoff=2.0, max_delay=5.0, jitter=False)
    assert [policy.wait_before(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    constant = RetryPolicy(retries=3, delay=0.25, backoff=1.0, jitter=False)
    assert [constant.wait_before(n) for n in (1, 2, 3)] == [0.25, 0.25, 0.25]


def test_retry_policy_refuses_bad_settings():
    with pytest.raises(ConfigurationError):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(delay=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_delay=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(backoff=0.5)


def test_retryable():
    policy = RetryPolicy(retries=3, no_retry_on=(KeyError,))
    assert policy.retryable(ConnectionError())
    assert policy.retryable(flowdesk.StepTimeout())
    assert not policy.retryable(flowdesk.Permanent())
    assert not policy.retryable(flowdesk.SerializationError())
    assert not policy.retryable(KeyError())


_delays = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
_backoffs = st.floats(min_value=1.0, max_value=10.0, allow_nan=False)
_retries = st.integers(min_value=1, max_value=5_000)


@settings(database=None, deadline=None)
@given(delay=_delays, backoff=_backoffs, max_delay=_delays, retry=_retries)
def test_wait_before_without_jitter_is_capped_and_never_shrinks(delay, backoff, max_delay, retry):
    policy = RetryPolicy(
        retries=retry + 1, delay=delay, backoff=backoff, max_delay=max_delay, jitter=False
    )
    wait = policy.wait_before(retry)
    assert 0.0 <= wait <= max_delay
    assert policy.wait_before(retry + 1) >= wait
    if retry == 1:
        assert wait == min(delay, max_delay)
    uncapped = delay * backoff ** min(retry - 1, 50)
    if retry <= 51 and uncapped < max_delay:
        assert wait == pytest.approx(uncapped)
        assert wait == pytest.approx(min(delay, max_delay) * backoff ** (retry - 1))


@settings(database=None, deadline=None)
@given(delay=_delays, backoff=_backoffs, max_delay=_delays, retry=_retries)
def test_wait_before_with_jitter_stays_within_half_to_full_base(delay, backoff, max_delay, retry):
    plain = RetryPolicy(delay=delay, backoff=backoff, max_delay=max_delay, jitter=False)
    jittered = RetryPolicy(delay=delay, backoff=backoff, max_delay=max_delay, jitter=True)
    base = plain.wait_before(retry)
    for _ in range(20):
        wait = jittered.wait_before(retry)
        assert 0.5 * base <= wait <= base


def test_jitter_actually_spreads_the_delays():
    policy = RetryPolicy(delay=1.0, backoff=2.0, max_delay=60.0, jitter=True)
    waits = {policy.wait_before(3) for _ in range(200)}
    assert len(waits) > 100
    assert min(waits) >= 2.0 and max(waits) <= 4.0


async def test_a_caught_step_failure_is_raised_the_same_way_on_replay(app, wait_status):
    calls: Counter[str] = Counter()
    seen: list[tuple[str, str, int, str, str]] = []

    @app.step(name="lookup", retries=1, retry_delay=0.001)
    async def lookup() -> str:
        calls["lookup"] += 1
        raise LookupError("no such customer")

    @app.step(name="fallback")
    async def fallback() -> str:
        calls["fallback"] += 1
        return "guest"

    @app.workflow("tolerant")
    async def tolerant(ctx: flowdesk.Context) -> str:
        try:
            who = await ctx.step(lookup)
        except flowdesk.StepFailed as exc:
            seen.append((type(exc).__name__, exc.step, exc.seq, exc.error_type, exc.error_message))
            who = await ctx.step(fallback)
        await ctx.wait_signal("go")
        return who

    async with app, app.worker(concurrency=2):
        h = await app.start("tolerant")
        await wait_status(app, h.id, flowdesk.RunStatus.WAITING)
        await app.signal(h.id, "go")
        assert await app.result(h.id, timeout=10) == "guest"
        steps = await app.steps(h.id)

    assert calls == {"lookup": 2, "fallback": 1}
    first = ("StepFailed", "lookup", 1, "LookupError", "no such customer")
    assert seen == [first, first]  # first execution, then the replay from the history
    assert [(s.name, s.status, s.attempts) for s in steps] == [
        ("lookup", "error", 2),
        ("fallback", "ok", 1),
        ("signal:go", "ok", 1),
    ]
