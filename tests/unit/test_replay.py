"""Recording and replay: every step is recorded once under (run, seq) and replay returns it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pydantic

import flowdesk
from flowdesk import RunStatus


class Quote(pydantic.BaseModel):
    sku: str
    price: float
    tags: list[str] = []


async def test_steps_are_recorded_under_run_and_seq_with_their_names(app):
    @app.step(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.step(name="double")
    def double(x: int) -> int:
        return x * 2

    @app.step
    async def unnamed(x: int) -> dict[str, int]:
        return {"x": x}

    @app.workflow("calc")
    async def calc(ctx: flowdesk.Context, x: int) -> list[Any]:
        s = await ctx.step(add, x, 1)
        d = await ctx.step(double, s)
        u = await ctx.step(unnamed, d)
        return [s, d, u]

    async with app, app.worker(concurrency=4):
        h = await app.start("calc", {"x": 4})
        assert h.created and h.workflow == "calc"
        assert await app.result(h.id, timeout=10) == [5, 10, {"x": 10}]
        steps = await app.steps(h.id)
        run = await app.get_run(h.id)

    assert run.status is RunStatus.SUCCEEDED
    assert run.output == [5, 10, {"x": 10}]
    assert [(s.run_id, s.seq, s.name, s.kind, s.status, s.output, s.attempts) for s in steps] == [
        (h.id, 1, "add", "step", "ok", 5, 1),
        (h.id, 2, "double", "step", "ok", 10, 1),
        (h.id, 3, unnamed.__qualname__, "step", "ok", {"x": 10}, 1),
    ]
    for s in steps:
        assert s.error is None
        assert s.finished_at is not None and s.finished_at >= s.started_at
        assert s.duration_ms is not None and s.duration_ms >= 0


async def test_sync_steps_run_in_the_thread_pool_without_blocking_the_loop(app, wait_until):
    loop_thread = threading.get_ident()
    gate = threading.Event()
    entered = threading.Event()

    @app.step(name="blocking")
    def blocking() -> dict[str, Any]:
        entered.set()
        # Only the event loop can open the gate: if this ran on the loop, it would time out.
        opened = gate.wait(10)
        return {
            "thread": threading.current_thread().name,
            "same_thread": threading.get_ident() == loop_thread,
            "opened": opened,
        }

    @app.step(name="on_loop")
    async def on_loop() -> bool:
        return threading.get_ident() == loop_thread

    @app.workflow("threads")
    async def threads(ctx: flowdesk.Context) -> dict[str, Any]:
        return {"sync": await ctx.step(blocking), "async_on_loop": await ctx.step(on_loop)}

    async with app, app.worker(concurrency=2):
        h = await app.start("threads")
        await wait_until(entered.is_set, what="sync step started")
        gate.set()
        out = await app.result(h.id, timeout=10)

    assert out["sync"]["opened"] is True
    assert out["sync"]["same_thread"] is False
    assert out["sync"]["thread"].startswith("flowdesk-step")
    assert out["async_on_loop"] is True


async def test_replay_after_a_signal_returns_recorded_results_without_rerunning(
    app, wait_status, wait_until
):
    calls: Counter[str] = Counter()

    @app.step(name="one")
    async def one() -> int:
        calls["one"] += 1
        return 1

    @app.step(name="two")
    def two(x: int) -> int:
        calls["two"] += 1
        return x + 1

    @app.step(name="three")
    async def three(x: int) -> dict[str, int]:
        calls["three"] += 1
        return {"value": x + 1}

    @app.step(name="four")
    async def four(x: int, extra: int) -> int:
        calls["four"] += 1
        return x + extra

    @app.workflow("replayed")
    async def replayed(ctx: flowdesk.Context) -> list[Any]:
        calls["workflow"] += 1
        a = await ctx.step(one)
        b = await ctx.step(two, a)
        c = await ctx.step(three, b)
        extra = await ctx.wait_signal("go")
        d = await ctx.step(four, c["value"], extra)
        return [a, b, c, d]

    async with app, app.worker(concurrency=4) as worker:
        h = await app.start("replayed")
        run = await wait_status(app, h.id, RunStatus.WAITING)
        assert run.waiting_for == ["go"]
        assert calls == {"workflow": 1, "one": 1, "two": 1, "three": 1}
        # The store shows "waiting" as the park commits; the worker lets go just after.
        await wait_until(lambda: not worker.holds(h.id), what="the worker let the run go")

        await app.signal(h.id, "go", 10)
        assert await app.result(h.id, timeout=10) == [1, 2, {"value": 3}, 13]
        steps = await app.steps(h.id)

    # The workflow function ran twice (first execution, then replay after the signal) ...
    assert calls["workflow"] == 2
    # ... but every step ran exactly once.
    assert calls == {"workflow": 2, "one": 1, "two": 1, "three": 1, "four": 1}
    assert [(s.seq, s.name, s.kind, s.status, s.output) for s in steps] == [
        (1, "one", "step", "ok", 1),
        (2, "two", "step", "ok", 2),
        (3, "three", "step", "ok", {"value": 3}),
        (4, "signal:go", "signal", "ok", 10),
        (5, "four", "step", "ok", 13),
    ]


async def test_pydantic_step_results_come_back_as_models_on_replay(app, wait_status):
    calls: Counter[str] = Counter()
    seen: list[tuple[type, type]] = []

    @app.step(name="quote")
    async def quote(sku: str) -> Quote:
        calls["quote"] += 1
        return Quote(sku=sku, price=9.5, tags=["a"])

    @app.step(name="quotes")
    def quotes(sku: str) -> list[Quote]:
        calls["quotes"] += 1
        return [Quote(sku=sku, price=1.0), Quote(sku=sku, price=2.0)]

    @app.workflow("priced")
    async def priced(ctx: flowdesk.Context, sku: str) -> dict[str, Any]:
        q = await ctx.step(quote, sku)
        qs = await ctx.step(quotes, sku)
        seen.append((type(q), type(qs[0])))
        await ctx.wait_signal("go")
        return {"sku": q.sku, "price": q.price, "tags": q.tags, "total": sum(x.price for x in qs)}

    async with app, app.worker(concurrency=2):
        h = await app.start("priced", {"sku": "A-1"})
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "go")
        out = await app.result(h.id, timeout=10)
        steps = await app.steps(h.id)

    assert out == {"sku": "A-1", "price": 9.5, "tags": ["a"], "total": 3.0}
    assert seen == [(Quote, Quote), (Quote, Quote)]  # first execution, then the replay
    assert calls == {"quote": 1, "quotes": 1}
    assert steps[0].output == {"sku": "A-1", "price": 9.5, "tags": ["a"]}


async def test_now_uuid_and_random_are_the_same_across_a_suspension(app, wait_status, wait_until):
    executions: list[dict[str, Any]] = []

    @app.step(name="remember")
    async def remember(values: dict[str, Any]) -> dict[str, Any]:
        return values

    def sample(ctx: flowdesk.Context) -> dict[str, Any]:
        now = ctx.now()
        assert isinstance(now, datetime) and now.tzinfo is not None
        return {"now": now.isoformat(), "uuid": str(ctx.uuid()), "random": ctx.random()}

    @app.workflow("clocks")
    async def clocks(ctx: flowdesk.Context) -> dict[str, Any]:
        before = sample(ctx)
        recorded_before = await ctx.step(remember, before)
        await ctx.wait_signal("go")
        after = sample(ctx)
        recorded_after = await ctx.step(remember, after)
        executions.append({"before": before, "after": after})
        await ctx.wait_signal("go2")
        return {
            "before": before,
            "after": after,
            "recorded_before": recorded_before,
            "recorded_after": recorded_after,
        }

    async with app, app.worker(concurrency=2):
        h = await app.start("clocks")
        await wait_status(app, h.id, RunStatus.WAITING)
        steps = await app.steps(h.id)
        first_now = datetime.fromisoformat(steps[1].output["now"]).timestamp()
        # Let the wall clock move on, so a fresh reading could not match by chance.
        await wait_until(lambda: time.time() > first_now + 0.02)
        await app.signal(h.id, "go")

        async def parked_again() -> bool:
            return (
                len(await app.steps(h.id)) == 6
                and (await app.get_run(h.id)).status is RunStatus.WAITING
            )

        await wait_until(parked_again, what="run waits for go2")
        await wait_until(
            lambda: (
                time.time()
                > datetime.fromisoformat(executions[0]["after"]["now"]).timestamp() + 0.02
            )
        )
        await app.signal(h.id, "go2")
        out = await app.result(h.id, timeout=10)
        steps = await app.steps(h.id)

    # Values computed on replay equal the ones recorded the first time.
    assert out["before"] == out["recorded_before"] == steps[1].output
    assert out["after"] == out["recorded_after"]
    assert [e["before"] for e in executions] == [out["before"], out["before"]]
    assert [e["after"] for e in executions] == [out["after"], out["after"]]
    # They are real readings, not constants.
    assert out["after"]["now"] > out["before"]["now"]
    assert out["after"]["uuid"] != out["before"]["uuid"]
    assert out["after"]["random"] != out["before"]["random"]
    assert [(s.seq, s.kind) for s in steps] == [
        (1, "now"),
        (2, "step"),
        (3, "signal"),
        (4, "now"),
        (5, "step"),
        (6, "signal"),
    ]


async def test_uuid_and_random_differ_between_runs(app):
    @app.workflow("ids")
    async def ids(ctx: flowdesk.Context) -> list[Any]:
        return [str(ctx.uuid()), ctx.random()]

    async with app, app.worker(concurrency=4):
        a = await app.start("ids")
        b = await app.start("ids")
        ra = await app.result(a.id, timeout=10)
        rb = await app.result(b.id, timeout=10)
    assert ra[0] != rb[0] and ra[1] != rb[1]


async def test_idempotency_key_is_run_id_and_seq(app):
    attempts: Counter[str] = Counter()

    @app.step(name="async_key")
    async def async_key(ctx: flowdesk.Context) -> list[Any]:
        info = flowdesk.current_step()
        assert info is not None
        return [
            info.idempotency_key,
            ctx.idempotency_key(),
            info.run_id,
            info.seq,
            info.name,
            info.attempt,
        ]

    @app.step(name="sync_key")
    def sync_key() -> str:
        info = flowdesk.current_step()
        assert info is not None
        return info.idempotency_key

    @app.step(name="flaky_key", retries=2, retry_delay=0.001)
    async def flaky_key() -> list[Any]:
        info = flowdesk.current_step()
        assert info is not None
        attempts["flaky"] += 1
        if info.attempt < 3:
            raise ConnectionError("not yet")
        return [info.idempotency_key, info.attempt]

    @app.workflow("keys")
    async def keys(ctx: flowdesk.Context) -> dict[str, Any]:
        before = ctx.idempotency_key()
        a = await ctx.step(async_key, ctx)
        between = ctx.idempotency_key()
        b = await ctx.step(sync_key)
        c = await ctx.step(flaky_key)
        return {
            "before": before,
            "a": a,
            "between": between,
            "b": b,
            "c": c,
            "outside": flowdesk.current_step() is None,
        }

    async with app, app.worker(concurrency=2):
        h = await app.start("keys")
        out = await app.result(h.id, timeout=10)

    rid = h.id
    assert out == {
        "before": f"{rid}:1",
        "a": [f"{rid}:1", f"{rid}:1", rid, 1, "async_key", 1],
        "between": f"{rid}:2",
        "b": f"{rid}:2",
        "c": [f"{rid}:3", 3],  # the same key on every attempt of a step
        "outside": True,
    }
    assert attempts["flaky"] == 3
    assert flowdesk.current_step() is None


async def test_a_step_returning_none_is_recorded_and_replayed(app, wait_status):
    calls: Counter[str] = Counter()

    @app.step(name="nothing")
    async def nothing() -> None:
        calls["nothing"] += 1

    @app.workflow("nones")
    async def nones(ctx: flowdesk.Context) -> list[Any]:
        first = await ctx.step(nothing)
        await ctx.wait_signal("go")
        return [first]

    async with app, app.worker(concurrency=2):
        h = await app.start("nones")
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "go")
        assert await app.result(h.id, timeout=10) == [None]
        steps = await app.steps(h.id)
    assert calls["nothing"] == 1
    assert (steps[0].status, steps[0].output) == ("ok", None)


async def test_many_concurrent_runs_each_record_their_own_steps(app):
    calls: Counter[int] = Counter()

    @app.step(name="square")
    async def square(x: int) -> int:
        calls[x] += 1
        await asyncio.sleep(0)
        return x * x

    @app.workflow("squares")
    async def squares(ctx: flowdesk.Context, n: int) -> int:
        a = await ctx.step(square, n)
        b = await ctx.step(square, n + 1000)
        return a + b

    async with app, app.worker(concurrency=50):
        handles = await asyncio.gather(*(app.start("squares", {"n": i}) for i in range(200)))
        results = await asyncio.gather(*(app.result(h.id, timeout=30) for h in handles))

    assert results == [i * i + (i + 1000) ** 2 for i in range(200)]
    assert set(calls.values()) == {1}
    assert len(calls) == 400
