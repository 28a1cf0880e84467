"""Workflow timeouts: a run past its deadline is cancelled with `WorkflowTimeout`, children
included, whether it was queued, running or waiting."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest

import flowdesk
from flowdesk import RunStatus

TIMED_OUT = {"type": "WorkflowTimeout", "message": "the run passed its timeout"}


def _ms(when: datetime | None) -> int:
    assert when is not None
    return round(when.timestamp() * 1000)


async def test_waiting_run_and_its_waiting_child_are_cancelled_at_the_deadline(app, wait_status):
    calls: Counter[str] = Counter()

    @app.step(name="after")
    async def after() -> None:
        calls["after"] += 1

    @app.workflow("approver")
    async def approver(ctx: flowdesk.Context) -> str:
        answer = await ctx.wait_signal("answer")
        await ctx.step(after)
        return answer

    @app.workflow("needs_approval", timeout=0.3)
    async def needs_approval(ctx: flowdesk.Context) -> str:
        result = await ctx.child(approver)
        await ctx.step(after)
        return result

    async with app, app.worker(concurrency=10):
        h = await app.start("needs_approval")
        run = await app.get_run(h.id)
        assert run.deadline_at is not None
        assert _ms(run.deadline_at) - _ms(run.created_at) == 300
        child_id = f"{h.id}-1"
        await wait_status(app, h.id, RunStatus.WAITING)
        await wait_status(app, child_id, RunStatus.WAITING)

        with pytest.raises(flowdesk.RunCancelled) as info:
            await app.result(h.id, timeout=10)
        assert info.value.reason == "the run passed its timeout"
        assert "timeout" in str(info.value)
        run = await app.get_run(h.id)
        assert run.status is RunStatus.CANCELLED
        assert run.error == TIMED_OUT
        assert _ms(run.finished_at) >= _ms(run.deadline_at)

        child = await app.get_run(child_id)
        assert child.status is RunStatus.CANCELLED
        assert child.error == TIMED_OUT
        with pytest.raises(flowdesk.RunCancelled):
            await app.result(child_id, timeout=1)
    assert calls["after"] == 0


async def test_running_run_is_cancelled_at_its_deadline(app):
    calls: Counter[str] = Counter()
    seen: list[float] = []

    @app.step(name="long")
    async def long() -> None:
        seen.append(time.time())
        await asyncio.sleep(30)
        calls["long-finished"] += 1

    @app.step(name="after")
    async def after() -> None:
        calls["after"] += 1

    @app.workflow("slow", timeout=timedelta(milliseconds=300))
    async def slow(ctx: flowdesk.Context) -> None:
        await ctx.step(long)
        await ctx.step(after)

    async with app, app.worker(concurrency=10) as worker:
        h = await app.start("slow")
        with pytest.raises(flowdesk.RunCancelled, match="the run passed its timeout"):
            await app.result(h.id, timeout=10)
        run = await app.get_run(h.id)
        assert run.error == TIMED_OUT
        assert run.status is RunStatus.CANCELLED
        assert run.lease_owner is None
        assert _ms(run.finished_at) >= _ms(run.deadline_at)
        assert worker.in_flight == 0
        assert [s.status for s in await app.steps(h.id)] == []  # the step never finished
    assert len(seen) == 1
    assert calls == {}


async def test_start_timeout_overrides_the_workflow_timeout(app):
    @app.step(name="nap")
    async def nap(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @app.workflow("patient", timeout=30)
    async def patient(ctx: flowdesk.Context, seconds: float) -> str:
        await ctx.step(nap, seconds)
        return "done"

    @app.workflow("hasty", timeout=0.2)
    async def hasty(ctx: flowdesk.Context, seconds: float) -> str:
        await ctx.step(nap, seconds)
        return "done"

    async with app, app.worker(concurrency=10):
        shorter = await app.start("patient", {"seconds": 30}, timeout=0.3)
        longer = await app.start("hasty", {"seconds": 0.5}, timeout=timedelta(seconds=30))
        default = await app.start("hasty", {"seconds": 30})
        with pytest.raises(flowdesk.RunCancelled, match="timeout"):
            await shorter.result(timeout=10)
        assert await longer.result(timeout=10) == "done"
        with pytest.raises(flowdesk.RunCancelled, match="timeout"):
            await default.result(timeout=10)
        runs = {h: await app.get_run(h.id) for h in (shorter, longer, default)}
    assert _ms(runs[shorter].deadline_at) - _ms(runs[shorter].created_at) == 300
    assert _ms(runs[longer].deadline_at) - _ms(runs[longer].created_at) == 30_000
    assert _ms(runs[default].deadline_at) - _ms(runs[default].created_at) == 200
    assert runs[shorter].error == TIMED_OUT and runs[default].error == TIMED_OUT
    assert runs[longer].status is RunStatus.SUCCEEDED and runs[longer].error is None


async def test_queued_run_in_a_full_queue_is_cancelled_at_its_deadline(app, wait_until):
    started: list[str] = []
    release = asyncio.Event()
    app.queue("single", concurrency=1)

    @app.step(name="job")
    async def job(label: str) -> None:
        started.append(label)
        if label == "blocker":
            await release.wait()

    @app.workflow("job", queue="single")
    async def wf(ctx: flowdesk.Context, label: str) -> str:
        await ctx.step(job, label)
        return label

    async with app, app.worker(concurrency=10):
        blocker = await app.start("job", {"label": "blocker"})
        await wait_until(lambda: started == ["blocker"], what="the blocker holds the slot")
        late = await app.start("job", {"label": "late"}, timeout=0.3)
        with pytest.raises(flowdesk.RunCancelled, match="the run passed its timeout"):
            await late.result(timeout=10)
        run = await app.get_run(late.id)
        assert run.error == TIMED_OUT
        assert run.started_at is None and run.attempts == 0  # it never ran
        release.set()
        assert await blocker.result(timeout=10) == "blocker"
        # The slot is free again, and the cancelled run stays cancelled.
        after = await app.start("job", {"label": "after"})
        assert await after.result(timeout=10) == "after"
        assert (await app.get_run(late.id)).status is RunStatus.CANCELLED
    assert started == ["blocker", "after"]


async def test_run_that_finishes_in_time_is_unaffected(app):
    @app.step(name="quick")
    async def quick() -> int:
        return 42

    @app.workflow("quick", timeout=0.5)
    async def quick_wf(ctx: flowdesk.Context) -> int:
        await ctx.sleep(0.1)  # a wait on the way does not matter either
        return await ctx.step(quick)

    async with app, app.worker(concurrency=10):
        h = await app.start("quick")
        assert await h.result(timeout=10) == 42
        done = await app.get_run(h.id)
        assert done.deadline_at is not None and done.finished_at < done.deadline_at
        # Past the deadline (and at least one sweep of overdue runs later) nothing changed.
        await asyncio.sleep(_ms(done.deadline_at) / 1000 - time.time() + 1.1)
        again = await app.get_run(h.id)
    assert again.status is RunStatus.SUCCEEDED
    assert again.output == 42 and again.error is None
    assert again.finished_at == done.finished_at


async def test_timed_out_run_is_not_claimed_over_and_over(app):
    """A waiting run whose deadline passed is due: whichever comes first (a claim, or the
    sweep of overdue runs) must end it, not resume it again and again."""

    @app.workflow("stuck", timeout=0.2)
    async def stuck(ctx: flowdesk.Context) -> None:
        await ctx.wait_signal("never")

    async with app, app.worker(concurrency=10):
        h = await app.start("stuck")
        with pytest.raises(flowdesk.RunCancelled):
            await app.result(h.id, timeout=10)
        run = await app.get_run(h.id)
    assert run.error == TIMED_OUT
    assert run.attempts <= 2


async def test_run_due_after_its_deadline_never_starts(app):
    calls: Counter[str] = Counter()

    @app.step(name="side_effect")
    def side_effect() -> None:
        calls["side_effect"] += 1

    @app.workflow("late")
    async def late(ctx: flowdesk.Context) -> None:
        await ctx.step(side_effect)

    async with app, app.worker(concurrency=10):
        # Due in 0.3 s, past its deadline by then: the claim must end it, not start it.
        h = await app.start("late", delay=0.3, timeout=0.1)
        with pytest.raises(flowdesk.RunCancelled, match="the run passed its timeout"):
            await app.result(h.id, timeout=10)
        await asyncio.sleep(0.1)  # a step handed to a thread would have run by now
    assert calls == {}
    assert (await _run_after_close(app, h.id)).error == TIMED_OUT


async def _run_after_close(app: flowdesk.App, run_id: str) -> flowdesk.Run:
    async with app:
        return await app.get_run(run_id)
