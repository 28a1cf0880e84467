"""Suspension: durable sleeps, signals and child workflows park the run in the store."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def _run_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("flowdesk-run-")]


async def test_ten_thousand_waiting_runs_hold_no_coroutine(app, wait_until):
    n = 10_000
    chunk = 1_000

    @app.workflow("parked")
    async def parked(ctx: flowdesk.Context, n: int) -> dict[str, Any]:
        payload = await ctx.wait_signal("go")
        return {"n": n, "got": payload}

    async with app, app.worker(concurrency=500) as worker:
        ids: list[str] = []
        for start in range(0, n, chunk):
            handles = await asyncio.gather(
                *(app.start("parked", {"n": i}) for i in range(start, start + chunk))
            )
            ids += [h.id for h in handles]
        assert len(set(ids)) == n

        async def all_waiting() -> bool:
            return await app.store.count_runs("waiting") == n

        await wait_until(all_waiting, timeout=60, interval=0.1, what="every run waits")
        # The last parked coroutines may still be returning; none may stay.
        await wait_until(lambda: worker.in_flight == 0, timeout=5, what="no coroutine held")
        assert worker.in_flight == 0
        assert _run_tasks() == []
        assert worker.claimed_total == n
        assert await app.store.count_runs("running") == 0

        for start in range(0, n, chunk):
            await asyncio.gather(
                *(app.signal(ids[i], "go", {"i": i}) for i in range(start, start + chunk))
            )

        async def all_done() -> bool:
            return await app.store.count_runs("succeeded") == n

        await wait_until(all_done, timeout=60, interval=0.1, what="every run succeeded")

        outputs: dict[str, Any] = {}
        cursor = None
        while True:
            page = await app.list_runs(workflow="parked", limit=1000, cursor=cursor)
            outputs.update({r.id: (r.input, r.output) for r in page.items})
            cursor = page.next_cursor
            if cursor is None:
                break
    assert len(outputs) == n
    for i, run_id in enumerate(ids):
        inp, out = outputs[run_id]
        assert out == {"n": inp["n"], "got": {"i": i}}
        assert inp["n"] == i


def _register_sleeper(app: flowdesk.App, log: list[tuple[str, float]]) -> None:
    @app.step(name="before")
    async def before() -> int:
        log.append(("before", time.time()))
        return 1

    @app.step(name="after")
    async def after() -> float:
        now = time.time()
        log.append(("after", now))
        return now

    @app.workflow("sleeper")
    async def sleeper(ctx: flowdesk.Context) -> float:
        await ctx.step(before)
        await ctx.sleep(1.0)
        return await ctx.step(after)


async def test_durable_sleep_survives_a_worker_restart(make_app, wait_status):
    log: list[tuple[str, float]] = []
    first = make_app()
    _register_sleeper(first, log)
    async with first, first.worker(concurrency=4) as w1:
        h = await first.start("sleeper")
        await wait_status(first, h.id, RunStatus.WAITING)
        assert not w1.holds(h.id)
    # The first worker and its app are gone; the run sleeps in the database only.

    second = make_app()
    _register_sleeper(second, log)
    async with second:
        run = await second.get_run(h.id)
        assert run.status is RunStatus.WAITING and run.lease_owner is None
        steps = await second.steps(h.id)
        assert [(s.seq, s.name, s.kind, s.status) for s in steps] == [
            (1, "before", "step", "ok"),
            (2, "sleep", "sleep", "pending"),
        ]
        wake_at = steps[1].output["wake_at"]
        assert run.due_at is not None and _ms(run.due_at) == wake_at

        async with second.worker(concurrency=4):
            value = await second.result(h.id, timeout=15)
        run = await second.get_run(h.id)
        steps = await second.steps(h.id)

    assert [name for name, _ in log] == ["before", "after"]  # neither step ran twice
    after_ms = log[1][1] * 1000
    assert value == log[1][1]
    sleep_row = steps[1]
    assert (sleep_row.status, sleep_row.output) == ("ok", {"wake_at": wake_at})
    assert sleep_row.finished_at is not None
    assert _ms(sleep_row.finished_at) >= wake_at
    # It fired no earlier than the wake time and soon after it (generous slack).
    assert after_ms >= wake_at
    assert run.finished_at is not None
    assert _ms(run.finished_at) <= wake_at + (second.poll_interval + 3.0) * 1000


async def test_a_sleep_that_is_already_due_on_replay_does_not_park_again(app, wait_until):
    calls: Counter[str] = Counter()

    @app.step(name="tick")
    async def tick() -> int:
        calls["tick"] += 1
        return calls["tick"]

    @app.workflow("naps")
    async def naps(ctx: flowdesk.Context) -> int:
        await ctx.sleep(0.05)
        first = await ctx.step(tick)
        await ctx.sleep(0)
        await ctx.wait_signal("go")
        return first

    async with app, app.worker(concurrency=2):
        h = await app.start("naps")

        async def waits_for_go() -> bool:
            return (await app.get_run(h.id)).waiting_for == ["go"]

        await wait_until(waits_for_go)
        steps = await app.steps(h.id)
        assert [(s.kind, s.status) for s in steps] == [
            ("sleep", "ok"),
            ("step", "ok"),
            ("sleep", "ok"),
            ("signal", "pending"),
        ]
        await app.signal(h.id, "go")
        assert await app.result(h.id, timeout=10) == 1
    assert calls["tick"] == 1


# -- signals ---------------------------------------------------------------------------


async def test_a_signal_sent_while_the_run_is_queued_is_delivered(app):
    @app.workflow("listener")
    async def listener(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("go")

    async with app:
        h = await app.start("listener")
        assert (await app.get_run(h.id)).status is RunStatus.QUEUED
        await app.signal(h.id, "go", {"v": 1})
        async with app.worker(concurrency=2):
            assert await app.result(h.id, timeout=10) == {"v": 1}
        steps = await app.steps(h.id)
    assert [(s.name, s.kind, s.status, s.output) for s in steps] == [
        ("signal:go", "signal", "ok", {"v": 1})
    ]


async def test_a_signal_sent_while_the_run_is_running_is_delivered(app, wait_until):
    entered = asyncio.Event()
    gate = asyncio.Event()

    @app.step(name="busy")
    async def busy() -> str:
        entered.set()
        await gate.wait()
        return "done"

    @app.workflow("busy_listener")
    async def busy_listener(ctx: flowdesk.Context) -> list[Any]:
        first = await ctx.step(busy)
        return [first, await ctx.wait_signal("go")]

    async with app, app.worker(concurrency=2):
        h = await app.start("busy_listener")
        await asyncio.wait_for(entered.wait(), 10)
        assert (await app.get_run(h.id)).status is RunStatus.RUNNING
        await app.signal(h.id, "go", "payload")
        gate.set()
        assert await app.result(h.id, timeout=10) == ["done", "payload"]


async def test_signals_of_one_name_are_consumed_in_order(app, wait_until):
    @app.workflow("inbox")
    async def inbox(ctx: flowdesk.Context) -> list[Any]:
        got = [await ctx.wait_signal("item"), await ctx.wait_signal("item")]
        other = await ctx.wait_signal("other")
        got.append(await ctx.wait_signal("item"))
        return [*got, other]

    async with app:
        h = await app.start("inbox")
        await app.signal(h.id, "item", 1)
        await app.signal(h.id, "item", 2)
        await app.signal(h.id, "item", 3)
        async with app.worker(concurrency=2):

            async def waits_for_other() -> bool:
                return (await app.get_run(h.id)).waiting_for == ["other"]

            await wait_until(waits_for_other)
            await app.signal(h.id, "other", "x")
            assert await app.result(h.id, timeout=10) == [1, 2, 3, "x"]


async def test_wait_signal_timeout_raises_wait_timeout_inside_the_workflow(
    app, wait_until, wait_status
):
    caught: list[type[BaseException]] = []
    calls: Counter[str] = Counter()

    @app.step(name="after_timeout")
    async def after_timeout() -> str:
        calls["after"] += 1
        return "carried on"

    @app.workflow("patient")
    async def patient(ctx: flowdesk.Context) -> dict[str, Any]:
        try:
            await ctx.wait_signal("reply", timeout=0.2)
            outcome = "replied"
        except flowdesk.WaitTimeout as exc:
            assert isinstance(exc, TimeoutError)
            caught.append(type(exc))
            outcome = "timed out"
        step = await ctx.step(after_timeout)
        late = await ctx.wait_signal("reply")  # a later signal goes to the next wait
        return {"outcome": outcome, "step": step, "late": late}

    async with app, app.worker(concurrency=2):
        h = await app.start("patient")

        async def parked_on_second_wait() -> bool:
            steps = await app.steps(h.id)
            return len(steps) == 3 and steps[2].status == "pending"

        await wait_until(parked_on_second_wait, what="run waits on the second wait")
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "reply", "late answer")
        out = await app.result(h.id, timeout=10)
        steps = await app.steps(h.id)

    assert out == {"outcome": "timed out", "step": "carried on", "late": "late answer"}
    assert calls["after"] == 1
    assert caught == [flowdesk.WaitTimeout, flowdesk.WaitTimeout]  # again on replay
    first = steps[0]
    assert (first.name, first.kind, first.status) == ("signal:reply", "signal", "error")
    assert first.error is not None and first.error["type"] == "WaitTimeout"
    assert first.finished_at is not None
    # The deadline is taken a moment before the start time: allow for one millisecond.
    assert (first.finished_at - first.started_at).total_seconds() >= 0.2 - 0.0015


async def test_a_signal_that_comes_before_the_timeout_is_returned(app, wait_status):
    @app.workflow("prompt")
    async def prompt(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("reply", timeout=60)

    async with app, app.worker(concurrency=2):
        h = await app.start("prompt")
        run = await wait_status(app, h.id, RunStatus.WAITING)
        assert run.waiting_for == ["reply"] and run.due_at is not None  # the deadline
        await app.signal(h.id, "reply", {"ok": True})
        assert await app.result(h.id, timeout=10) == {"ok": True}


async def test_an_uncaught_wait_timeout_fails_the_run(app):
    @app.workflow("impatient")
    async def impatient(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("reply", timeout=0.1)

    async with app, app.worker(concurrency=2):
        h = await app.start("impatient")
        with pytest.raises(flowdesk.RunFailed) as info:
            await app.result(h.id, timeout=10)
        run = await app.get_run(h.id)
    assert info.value.error["type"] == "WaitTimeout"
    assert run.status is RunStatus.FAILED and run.failed_seq == 1


async def test_signal_to_an_unknown_run_raises_run_not_found(app, query):
    @app.workflow("noop")
    async def noop(ctx: flowdesk.Context) -> None:
        return None

    async with app:
        with pytest.raises(flowdesk.RunNotFound) as info:
            await app.signal("no-such-run", "go", 1)
        assert info.value.run_id == "no-such-run"
    assert query("SELECT COUNT(*) FROM signals") == [(0,)]


async def test_signal_to_a_finished_run_raises_invalid_state(app, query):
    @app.workflow("quick")
    async def quick(ctx: flowdesk.Context) -> int:
        return 1

    async with app, app.worker(concurrency=2):
        h = await app.start("quick")
        assert await app.result(h.id, timeout=10) == 1
        with pytest.raises(flowdesk.InvalidState, match="succeeded"):
            await app.signal(h.id, "go", 1)
    assert query("SELECT COUNT(*) FROM signals") == [(0,)]


async def test_a_signal_payload_that_is_not_json_is_refused(app):
    @app.workflow("listener2")
    async def listener2(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("go")

    async with app:
        h = await app.start("listener2")
        with pytest.raises(flowdesk.SerializationError, match="go"):
            await app.signal(h.id, "go", object())


# -- child workflows -------------------------------------------------------------------


async def test_child_workflows_return_results_and_failures(app):
    calls: Counter[str] = Counter()

    @app.step(name="times_two")
    async def times_two(x: int) -> int:
        calls["times_two"] += 1
        return x * 2

    @app.step(name="explode")
    async def explode() -> None:
        calls["explode"] += 1
        raise flowdesk.Permanent("child went wrong")

    @app.workflow("kid.double")
    async def double(ctx: flowdesk.Context, x: int) -> int:
        return await ctx.step(times_two, x)

    @app.workflow("kid.fail")
    async def fail(ctx: flowdesk.Context, x: int) -> int:
        await ctx.step(explode)
        return x

    @app.workflow("parent")
    async def parent(ctx: flowdesk.Context, x: int) -> dict[str, Any]:
        calls["parent"] += 1
        doubled = await ctx.child("kid.double", {"x": x})
        try:
            await ctx.child(fail, {"x": x})  # by function, not by name
        except flowdesk.StepFailed as exc:
            err = {
                "step": exc.step,
                "seq": exc.seq,
                "type": exc.error_type,
                "message": exc.error_message,
            }
        else:
            err = None
        return {"doubled": doubled, "err": err}

    async with app, app.worker(concurrency=4):
        h = await app.start("parent", {"x": 21})
        out = await app.result(h.id, timeout=15)
        kids = (await app.list_runs(workflow="kid.double")).items
        failed_kids = (await app.list_runs(workflow="kid.fail")).items
        steps = await app.steps(h.id)

    assert out["doubled"] == 42
    err = out["err"]
    assert err is not None
    assert (err["step"], err["seq"], err["type"]) == ("child:kid.fail", 2, "StepFailed")
    assert "failed" in err["message"] and "child went wrong" in err["message"]
    assert [(k.parent_id, k.parent_seq, k.status, k.output) for k in kids] == [
        (h.id, 1, RunStatus.SUCCEEDED, 42)
    ]
    assert [(k.parent_id, k.parent_seq, k.status) for k in failed_kids] == [
        (h.id, 2, RunStatus.FAILED)
    ]
    assert [(s.seq, s.name, s.kind, s.status) for s in steps] == [
        (1, "child:kid.double", "child", "ok"),
        (2, "child:kid.fail", "child", "ok"),
    ]
    # The parent ran three times (start, after each child) but each child ran once.
    assert calls == {"parent": 3, "times_two": 1, "explode": 1}


async def test_a_failing_child_fails_a_parent_that_does_not_catch_it(app):
    @app.step(name="boom")
    async def boom() -> None:
        raise flowdesk.Permanent("nope")

    @app.workflow("kid.boom")
    async def kid(ctx: flowdesk.Context) -> None:
        await ctx.step(boom)

    @app.workflow("careless")
    async def careless(ctx: flowdesk.Context) -> Any:
        return await ctx.child("kid.boom")

    async with app, app.worker(concurrency=4):
        h = await app.start("careless")
        with pytest.raises(flowdesk.RunFailed) as info:
            await app.result(h.id, timeout=15)
        run = await app.get_run(h.id)
    assert info.value.error["type"] == "StepFailed"
    assert "child:kid.boom" in info.value.error["message"]
    assert run.failed_seq == 1
