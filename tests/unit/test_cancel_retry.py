"""Cancelling runs, and resuming failed runs with `App.retry`."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus

# -- cancel ----------------------------------------------------------------------------


async def test_cancelling_a_waiting_run_ends_it_at_once(app, wait_status):
    calls: Counter[str] = Counter()

    @app.step(name="after_approval")
    async def after_approval() -> None:
        calls["after"] += 1

    @app.workflow("approval")
    async def approval(ctx: flowdesk.Context) -> None:
        await ctx.wait_signal("approved")
        await ctx.step(after_approval)

    async with app, app.worker(concurrency=2):
        h = await app.start("approval")
        await wait_status(app, h.id, RunStatus.WAITING)
        status = await app.cancel(h.id, "customer changed their mind")
        assert status is RunStatus.CANCELLED
        run = await app.get_run(h.id)  # no waiting for a worker
        assert run.status is RunStatus.CANCELLED
        assert run.finished_at is not None and run.waiting_for == []
        assert run.error == {"type": "Cancelled", "message": "customer changed their mind"}
        with pytest.raises(flowdesk.RunCancelled) as info:
            await app.result(h.id, timeout=5)
        assert info.value.reason == "customer changed their mind"
        assert info.value.run_id == h.id
        with pytest.raises(flowdesk.InvalidState):
            await app.signal(h.id, "approved", True)
        # Cancelling again is harmless.
        assert await app.cancel(h.id, "again") is RunStatus.CANCELLED
        assert (await app.get_run(h.id)).error == run.error
    assert calls["after"] == 0


async def test_cancelling_a_queued_run(app):
    @app.workflow("never_started")
    async def never_started(ctx: flowdesk.Context) -> int:
        return 1

    async with app:
        h = await app.start("never_started")
        assert await app.cancel(h.id) is RunStatus.CANCELLED
        async with app.worker(concurrency=2) as worker:
            with pytest.raises(flowdesk.RunCancelled, match="cancelled by request"):
                await app.result(h.id, timeout=5)
            assert worker.claimed_total == 0


async def test_cancelling_a_running_run_stops_its_step(app):
    entered = asyncio.Event()
    never = asyncio.Event()
    calls: Counter[str] = Counter()

    @app.step(name="blocked")
    async def blocked() -> None:
        entered.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            calls["cancelled"] += 1
            raise

    @app.step(name="after_block")
    async def after_block() -> None:
        calls["after"] += 1

    @app.workflow("stuck")
    async def stuck(ctx: flowdesk.Context) -> None:
        await ctx.step(blocked)
        await ctx.step(after_block)

    async with app, app.worker(concurrency=2, grace_seconds=1) as worker:
        h = await app.start("stuck")
        await asyncio.wait_for(entered.wait(), 10)
        assert await app.cancel(h.id, "stop now") is RunStatus.RUNNING
        with pytest.raises(flowdesk.RunCancelled) as info:
            await app.result(h.id, timeout=10)
        assert info.value.reason == "stop now"
        run = await app.get_run(h.id)
        steps = await app.steps(h.id)
        assert not worker.holds(h.id)

    assert run.status is RunStatus.CANCELLED and run.lease_owner is None
    assert calls == {"cancelled": 1}
    assert steps == []  # the interrupted step recorded nothing


async def test_cancelling_from_another_app_reaches_the_worker_by_heartbeat(make_app):
    entered = asyncio.Event()
    calls: Counter[str] = Counter()

    runner = make_app(lease_seconds=5, heartbeat_interval=0.05)

    @runner.step(name="long_sleep")
    async def long_sleep() -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            calls["cancelled"] += 1
            raise

    @runner.workflow("sleepy")
    async def sleepy(ctx: flowdesk.Context) -> None:
        await ctx.step(long_sleep)

    client = make_app()
    async with runner, runner.worker(concurrency=2, grace_seconds=1), client:
        h = await runner.start("sleepy")
        await asyncio.wait_for(entered.wait(), 10)
        assert await client.cancel(h.id, "from the CLI") is RunStatus.RUNNING
        with pytest.raises(flowdesk.RunCancelled, match="from the CLI"):
            await client.result(h.id, timeout=10)
    assert calls["cancelled"] == 1


async def test_cancelling_a_parent_cancels_its_waiting_child(app, wait_status):
    @app.workflow("kid.waits")
    async def kid(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("never")

    @app.workflow("dad")
    async def dad(ctx: flowdesk.Context) -> Any:
        return await ctx.child("kid.waits")

    async with app, app.worker(concurrency=4):
        h = await app.start("dad")
        child_id = f"{h.id}-1"
        await wait_status(app, h.id, RunStatus.WAITING)
        child = await wait_status(app, child_id, RunStatus.WAITING)
        assert child.parent_id == h.id
        assert await app.cancel(h.id, "abort the order") is RunStatus.CANCELLED
        child = await app.get_run(child_id)
        assert child.status is RunStatus.CANCELLED
        assert child.error is not None and child.error["message"] == "abort the order"
        with pytest.raises(flowdesk.RunCancelled):
            await app.result(child_id, timeout=5)
        with pytest.raises(flowdesk.RunCancelled):
            await app.result(h.id, timeout=5)


async def test_cancelling_a_finished_run_is_invalid(app):
    @app.workflow("done")
    async def done(ctx: flowdesk.Context) -> int:
        return 1

    @app.step(name="fails")
    async def fails() -> None:
        raise flowdesk.Permanent("no")

    @app.workflow("broken")
    async def broken(ctx: flowdesk.Context) -> None:
        await ctx.step(fails)

    async with app, app.worker(concurrency=2):
        ok = await app.start("done")
        bad = await app.start("broken")
        assert await app.result(ok.id, timeout=10) == 1
        with pytest.raises(flowdesk.RunFailed):
            await app.result(bad.id, timeout=10)
        with pytest.raises(flowdesk.InvalidState, match="succeeded"):
            await app.cancel(ok.id)
        with pytest.raises(flowdesk.InvalidState, match="failed"):
            await app.cancel(bad.id)
        with pytest.raises(flowdesk.RunNotFound):
            await app.cancel("no-such-run")
        assert (await app.get_run(ok.id)).status is RunStatus.SUCCEEDED
        assert (await app.get_run(bad.id)).status is RunStatus.FAILED


# -- retry -----------------------------------------------------------------------------


async def test_retry_resumes_a_failed_run_from_the_failed_step(app):
    calls: Counter[str] = Counter()
    broken = {"s3": True}

    @app.step(name="s1")
    async def s1() -> int:
        calls["s1"] += 1
        return 1

    @app.step(name="s2")
    def s2(x: int) -> int:
        calls["s2"] += 1
        return x + 1

    @app.step(name="s3")
    async def s3(x: int) -> int:
        calls["s3"] += 1
        if broken["s3"]:
            raise flowdesk.Permanent("misconfigured")
        return x + 1

    @app.step(name="s4")
    async def s4(x: int) -> int:
        calls["s4"] += 1
        return x * 10

    @app.workflow("pipeline")
    async def pipeline(ctx: flowdesk.Context) -> list[int]:
        a = await ctx.step(s1)
        b = await ctx.step(s2, a)
        c = await ctx.step(s3, b)
        return [a, b, c, await ctx.step(s4, c)]

    async with app, app.worker(concurrency=2):
        h = await app.start("pipeline")
        with pytest.raises(flowdesk.RunFailed):
            await app.result(h.id, timeout=10)
        run = await app.get_run(h.id)
        assert run.failed_seq == 3
        assert calls == {"s1": 1, "s2": 1, "s3": 1}

        broken["s3"] = False
        again = await app.retry(h.id)
        assert (again.id, again.workflow, again.created) == (h.id, "pipeline", False)
        assert await app.result(h.id, timeout=10) == [1, 2, 3, 30]
        run = await app.get_run(h.id)
        steps = await app.steps(h.id)

    assert calls == {"s1": 1, "s2": 1, "s3": 2, "s4": 1}
    assert run.status is RunStatus.SUCCEEDED
    assert run.error is None and run.failed_seq is None
    assert run.attempts == 2
    assert [(s.seq, s.name, s.status, s.output, s.error) for s in steps] == [
        (1, "s1", "ok", 1, None),
        (2, "s2", "ok", 2, None),
        (3, "s3", "ok", 3, None),
        (4, "s4", "ok", 30, None),
    ]


async def test_retry_keeps_a_signal_consumed_before_the_failed_step(app, wait_status):
    calls: Counter[str] = Counter()
    broken = {"on": True}

    @app.step(name="use")
    async def use(x: int) -> int:
        calls["use"] += 1
        if broken["on"]:
            raise flowdesk.Permanent("later")
        return x * 2

    @app.workflow("signalled")
    async def signalled(ctx: flowdesk.Context) -> int:
        x = await ctx.wait_signal("x")
        return await ctx.step(use, x)

    async with app, app.worker(concurrency=2):
        h = await app.start("signalled")
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "x", 21)
        with pytest.raises(flowdesk.RunFailed):
            await app.result(h.id, timeout=10)
        broken["on"] = False
        await app.retry(h.id)
        assert await app.result(h.id, timeout=10) == 42
    assert calls["use"] == 2


async def test_retry_after_an_uncaught_wait_timeout_waits_again(app, wait_status):
    timeouts = [0.1, 30.0]  # the first execution times out; the retried one can wait

    @app.workflow("second_chance")
    async def second_chance(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("answer", timeout=timeouts[0])

    async with app, app.worker(concurrency=2):
        h = await app.start("second_chance")
        with pytest.raises(flowdesk.RunFailed):
            await app.result(h.id, timeout=10)
        assert (await app.get_run(h.id)).failed_seq == 1
        timeouts.pop(0)
        await app.retry(h.id)
        await app.signal(h.id, "answer", "yes")  # queued or waiting: either way it counts
        assert await app.result(h.id, timeout=10) == "yes"


async def test_retry_of_a_run_that_did_not_fail_is_invalid(app, wait_status):
    @app.workflow("fine")
    async def fine(ctx: flowdesk.Context) -> int:
        return 1

    @app.workflow("waits")
    async def waits(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("go")

    async with app, app.worker(concurrency=2):
        ok = await app.start("fine")
        assert await app.result(ok.id, timeout=10) == 1
        waiting = await app.start("waits")
        await wait_status(app, waiting.id, RunStatus.WAITING)
        with pytest.raises(flowdesk.InvalidState, match="only failed runs"):
            await app.retry(ok.id)
        with pytest.raises(flowdesk.InvalidState, match="waiting"):
            await app.retry(waiting.id)
        await app.cancel(waiting.id)
        with pytest.raises(flowdesk.InvalidState, match="cancelled"):
            await app.retry(waiting.id)
        with pytest.raises(flowdesk.RunNotFound):
            await app.retry("no-such-run")
        assert (await app.get_run(ok.id)).status is RunStatus.SUCCEEDED
