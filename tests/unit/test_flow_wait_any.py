"""`Context.wait_any`: the first of several signals, timers and child workflows."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import flowdesk
from flowdesk import Child, FirstOf, RunStatus, Signal, Timer

LOST = {"type": "Cancelled", "message": "another branch of wait_any won"}


def _register_children(app: flowdesk.App) -> None:
    @app.workflow("slow_child")
    async def slow_child(ctx: flowdesk.Context, tag: str = "") -> str:
        return f"slow:{tag}:{await ctx.wait_signal('finish')}"

    @app.step(name="quick")
    async def quick(tag: str) -> str:
        return f"quick:{tag}"

    @app.workflow("quick_child")
    async def quick_child(ctx: flowdesk.Context, tag: str = "") -> str:
        return await ctx.step(quick, tag)

    @app.step(name="explode")
    async def explode() -> None:
        raise ValueError("boom")

    @app.workflow("failing_child")
    async def failing_child(ctx: flowdesk.Context) -> None:
        await ctx.step(explode)


async def _children(
    app: flowdesk.App, query: Any, parent_id: str
) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Status and error of each child (errors are stored sealed: read through the store)."""
    return {
        run_id: (status, (await app.get_run(run_id)).error)
        for run_id, status in query("SELECT id, status FROM runs WHERE parent_id = ?", (parent_id,))
    }


async def _child_status(app: flowdesk.App, run_id: str) -> RunStatus:
    return (await app.get_run(run_id)).status


async def test_signal_wins(app, wait_status):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> list[Any]:
        first = await ctx.wait_any([Timer(30), Signal("go"), Child("slow_child", {"tag": "a"})])
        assert isinstance(first, FirstOf)
        index, value = first
        return [index, value]

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        await wait_status(app, h.id, RunStatus.WAITING)
        child_id = f"{h.id}-1-2"
        await wait_status(app, child_id, RunStatus.WAITING)
        await app.signal(h.id, "go", {"ok": True})
        assert await h.result(timeout=10) == [1, {"ok": True}]
        child = await app.get_run(child_id)
        assert child.status is RunStatus.CANCELLED
        assert child.error == LOST
        step = (await app.steps(h.id))[0]
        assert (step.kind, step.status) == ("any", "ok")
        assert step.name == "any:timer|signal:go|child:slow_child"


async def test_timer_wins_and_the_child_is_cancelled(app, wait_status):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> list[Any]:
        index, value = await ctx.wait_any(
            [Signal("go"), Child("slow_child"), Timer(0.3), Timer(20)]
        )
        return [index, value]

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        assert await h.result(timeout=10) == [2, None]
        child = await app.get_run(f"{h.id}-1-1")
        assert child.status is RunStatus.CANCELLED
        assert child.error == LOST
        # A signal for the branch that lost is refused: the run is over.
        with pytest.raises(flowdesk.InvalidState):
            await app.signal(h.id, "go", 1)


async def test_child_wins_and_the_other_child_is_cancelled(app, query):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> list[Any]:
        index, value = await ctx.wait_any(
            [
                Child("slow_child", {"tag": "s"}),
                Signal("go"),
                Child("quick_child", {"tag": "q"}),
                Timer(30),
            ]
        )
        return [index, value]

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        assert await h.result(timeout=10) == [2, "quick:q"]
        assert await _children(app, query, h.id) == {
            f"{h.id}-1-0": (
                "cancelled",
                {"type": "Cancelled", "message": "another branch of wait_any won"},
            ),
            f"{h.id}-1-2": ("succeeded", None),
        }


async def test_cancel_others_false_leaves_the_losing_child_running(app, wait_status):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> list[Any]:
        index, value = await ctx.wait_any(
            [Signal("go"), Child("slow_child", {"tag": "kept"})], cancel_others=False
        )
        return [index, value]

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        child_id = f"{h.id}-1-1"
        await wait_status(app, h.id, RunStatus.WAITING)
        await wait_status(app, child_id, RunStatus.WAITING)
        await app.signal(h.id, "go", 7)
        assert await h.result(timeout=10) == [0, 7]
        assert await _child_status(app, child_id) is RunStatus.WAITING
        await app.signal(child_id, "finish", "late")
        assert await app.result(child_id, timeout=10) == "slow:kept:late"


async def test_cancel_others_false_with_a_timer(app, wait_status):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> list[Any]:
        index, value = await ctx.wait_any([Child("slow_child"), Timer(0.2)], cancel_others=False)
        return [index, value]

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        assert await h.result(timeout=10) == [1, None]
        child_id = f"{h.id}-1-0"
        assert await _child_status(app, child_id) is RunStatus.WAITING
        await app.signal(child_id, "finish", "x")
        assert await app.result(child_id, timeout=10) == "slow::x"


async def test_a_losing_signal_stays_pending_for_a_later_wait(app, wait_status):
    release = asyncio.Event()

    @app.step(name="hold")
    async def hold() -> None:
        await release.wait()

    @app.workflow("two_signals")
    async def two_signals(ctx: flowdesk.Context) -> list[Any]:
        await ctx.step(hold)
        index, value = await ctx.wait_any([Signal("b"), Signal("a")])
        later_b = await ctx.wait_signal("b", timeout=5)
        later_a = await ctx.wait_any([Signal("a"), Timer(5)])
        return [index, value, later_b, list(later_a)]

    async with app, app.worker(concurrency=10):
        h = await app.start("two_signals")
        await wait_status(app, h.id, RunStatus.RUNNING)
        # Both arrive before the wait: the older ("a", then a second "a") comes first.
        await app.signal(h.id, "a", "a1")
        await app.signal(h.id, "b", "b1")
        await app.signal(h.id, "a", "a2")
        release.set()
        assert await h.result(timeout=10) == [1, "a1", "b1", [0, "a2"]]


async def test_a_signal_sent_before_the_run_starts_is_delivered(app):
    @app.workflow("early")
    async def early(ctx: flowdesk.Context) -> list[Any]:
        return list(await ctx.wait_any([Timer(20), Signal("go")]))

    async with app:
        h = await app.start("early", delay=0.2)
        await app.signal(h.id, "go", "before")
        assert (await app.get_run(h.id)).status is RunStatus.QUEUED
        async with app.worker():
            assert await h.result(timeout=10) == [1, "before"]
    # It never had to park: the signal was taken on the way in.
    steps = await _steps_after_close(app, h.id)
    assert [(s.kind, s.status) for s in steps] == [("any", "ok")]


async def _steps_after_close(app: flowdesk.App, run_id: str) -> list[flowdesk.StepRecord]:
    async with app:
        return await app.steps(run_id)


async def test_replay_after_the_wait_returns_the_recorded_winner(
    app, wait_status, wait_until, query
):
    seen: list[tuple[int, Any]] = []
    calls: Counter[str] = Counter()

    @app.step(name="between")
    async def between() -> None:
        calls["between"] += 1

    @app.workflow("replayed")
    async def replayed(ctx: flowdesk.Context) -> list[Any]:
        first = await ctx.wait_any([Signal("go"), Timer(0.3)])
        seen.append((first.index, first.value))  # on every execution, replays included
        await ctx.step(between)
        nxt = await ctx.wait_signal("next")
        return [first.index, first.value, nxt]

    async with app, app.worker(concurrency=10):
        h = await app.start("replayed")
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "go", "g1")

        async def parked_on_next() -> bool:
            run = await app.get_run(h.id)
            return run.status is RunStatus.WAITING and run.waiting_for == ["next"]

        await wait_until(parked_on_next, what="the run waits for 'next'")
        # By now the timer branch would have won if the wait were decided again, and a
        # second "go" is available to be taken.
        await asyncio.sleep(0.4)
        await app.signal(h.id, "go", "g2")
        await app.signal(h.id, "next", "n")
        assert await h.result(timeout=10) == [0, "g1", "n"]
        # (signal payloads are stored sealed: read them through the store)
        signals = await app.store.signals_of(h.id)
    assert seen == [(0, "g1"), (0, "g1")]
    assert calls["between"] == 1
    # The second "go" was not consumed by the replay.
    assert [(s["payload"], s["consumed_seq"]) for s in signals if s["name"] == "go"] == [
        ("g1", 1),
        ("g2", None),
    ]


async def test_a_failed_child_that_wins_raises_step_failed(app, query):
    _register_children(app)

    @app.workflow("race")
    async def race(ctx: flowdesk.Context) -> dict[str, Any]:
        try:
            await ctx.wait_any([Child("slow_child"), Child("failing_child"), Timer(30)])
        except flowdesk.StepFailed as exc:
            return {
                "step": exc.step,
                "seq": exc.seq,
                "type": exc.error_type,
                "message": exc.error_message,
            }
        return {}

    @app.workflow("race_uncaught")
    async def race_uncaught(ctx: flowdesk.Context) -> None:
        await ctx.wait_any([Signal("never"), Child("failing_child")])

    async with app, app.worker(concurrency=10):
        h = await app.start("race")
        out = await h.result(timeout=10)
        assert out["step"] == "any:child:slow_child|child:failing_child|timer"
        assert out["seq"] == 1
        assert out["type"] == "StepFailed"
        assert f"child run {h.id}-1-1 failed" in out["message"]
        assert "boom" in out["message"]
        kids = await _children(app, query, h.id)
        assert kids[f"{h.id}-1-0"][0] == "cancelled"
        assert kids[f"{h.id}-1-1"][0] == "failed"

        u = await app.start("race_uncaught")
        with pytest.raises(flowdesk.RunFailed) as failed:
            await u.result(timeout=10)
        assert failed.value.error["type"] == "StepFailed"
        assert "boom" in failed.value.error["message"]
        assert (await app.get_run(u.id)).failed_seq == 1
