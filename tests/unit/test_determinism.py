"""Determinism checks on replay, and `ctx.version` for changing code under running runs.

Each test deploys "old code" and "new code" as two App objects on the same database file,
with the same workflow name: the old app records a run, the new app replays it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus


def _order_v1(app: flowdesk.App, calls: Counter[str]) -> None:
    @app.step(name="reserve")
    async def reserve() -> str:
        calls["reserve"] += 1
        return "reserved"

    @app.step(name="charge")
    async def charge() -> str:
        calls["charge"] += 1
        return "charged"

    @app.step(name="ship")
    async def ship() -> str:
        calls["ship"] += 1
        return "shipped"

    @app.workflow("order")
    async def order(ctx: flowdesk.Context) -> list[str]:
        a = await ctx.step(reserve)
        b = await ctx.step(charge)
        await ctx.wait_signal("go")
        return [a, b, await ctx.step(ship)]


def _order_v2(app: flowdesk.App, calls: Counter[str]) -> None:
    """The same workflow, but the second step was replaced (charge -> bill)."""

    @app.step(name="reserve")
    async def reserve() -> str:
        calls["reserve"] += 1
        return "reserved"

    @app.step(name="bill")
    async def bill() -> str:
        calls["bill"] += 1
        return "billed"

    @app.step(name="ship")
    async def ship() -> str:
        calls["ship"] += 1
        return "shipped"

    @app.workflow("order")
    async def order(ctx: flowdesk.Context) -> list[str]:
        a = await ctx.step(reserve)
        b = await ctx.step(bill)
        await ctx.wait_signal("go")
        return [a, b, await ctx.step(ship)]


async def test_a_changed_step_at_a_recorded_seq_fails_the_run_with_non_determinism(
    make_app, wait_status, query
):
    calls: Counter[str] = Counter()
    old = make_app()
    _order_v1(old, calls)
    async with old, old.worker(concurrency=2):
        h = await old.start("order")
        await wait_status(old, h.id, RunStatus.WAITING)
    assert calls == {"reserve": 1, "charge": 1}

    new = make_app()
    _order_v2(new, calls)
    async with new, new.worker(concurrency=2) as worker:
        await new.signal(h.id, "go")
        with pytest.raises(flowdesk.RunFailed) as info:
            await new.result(h.id, timeout=10)
        run = await new.get_run(h.id)
        steps = await new.steps(h.id)
        claims = worker.claimed_total

        # It stays parked: another signal cannot wake it, and nothing claims it again.
        with pytest.raises(flowdesk.InvalidState):
            await new.signal(h.id, "go")
        assert not await new.store.has_due(["default"], ["order"])

    error = info.value.error
    assert error["type"] == "NonDeterminismError"
    assert "'charge'" in error["message"] and "'bill'" in error["message"]
    assert "seq 2" in error["message"]
    assert run.status is RunStatus.FAILED
    # Nothing after the mismatch ran, and nothing new was recorded.
    assert calls == {"reserve": 1, "charge": 1}
    assert [(s.seq, s.name, s.status) for s in steps] == [
        (1, "reserve", "ok"),
        (2, "charge", "ok"),
        (3, "signal:go", "pending"),
    ]
    assert claims == 1
    assert query("SELECT attempts FROM runs WHERE id = ?", (h.id,)) == [(2,)]


async def test_a_changed_kind_of_call_is_non_determinism_too(make_app, wait_status):
    calls: Counter[str] = Counter()
    old = make_app()

    @old.workflow("napper")
    async def napper_old(ctx: flowdesk.Context) -> str:
        await ctx.wait_signal("go")
        return "old"

    async with old, old.worker(concurrency=2):
        h = await old.start("napper")
        await wait_status(old, h.id, RunStatus.WAITING)

    new = make_app()

    @new.step(name="signal:go")  # same name as the recorded wait, but a step
    async def impostor() -> str:
        calls["impostor"] += 1
        return "x"

    @new.workflow("napper")
    async def napper_new(ctx: flowdesk.Context) -> str:
        await ctx.step(impostor)
        return "new"

    async with new, new.worker(concurrency=2):
        await new.signal(h.id, "go")
        with pytest.raises(flowdesk.RunFailed) as info:
            await new.result(h.id, timeout=10)
    assert info.value.error["type"] == "NonDeterminismError"
    assert calls["impostor"] == 0


async def test_workflow_code_cannot_swallow_non_determinism(make_app, wait_status):
    """A workflow that wraps a step in ``except Exception`` (to compensate, say) must not
    turn a history mismatch into new side effects or a successful run."""
    calls: Counter[str] = Counter()
    old = make_app()

    @old.step(name="reserve")
    async def reserve() -> str:
        calls["reserve"] += 1
        return "reserved"

    @old.workflow("approval")
    async def approval_old(ctx: flowdesk.Context) -> dict[str, Any]:
        await ctx.step(reserve)
        approved = await ctx.wait_signal("approve")
        return {"status": "approved" if approved else "rejected"}

    async with old, old.worker(concurrency=2):
        h = await old.start("approval")
        await wait_status(old, h.id, RunStatus.WAITING)

    new = make_app()

    @new.step(name="reserve")
    async def reserve_new() -> str:
        calls["reserve"] += 1
        return "reserved"

    @new.step(name="auto_approve")
    async def auto_approve() -> bool:
        calls["auto_approve"] += 1
        return True

    @new.step(name="release_stock")
    async def release_stock() -> None:
        calls["release_stock"] += 1

    @new.workflow("approval")
    async def approval_new(ctx: flowdesk.Context) -> dict[str, Any]:
        await ctx.step(reserve_new)
        try:
            approved = await ctx.step(auto_approve)  # replaced the human approval
        except Exception:
            await ctx.step(release_stock)  # compensation
            return {"status": "released"}
        return {"status": "approved" if approved else "rejected"}

    async with new, new.worker(concurrency=2):
        await new.signal(h.id, "approve", True)
        with pytest.raises(flowdesk.RunFailed) as info:
            await new.result(h.id, timeout=10)
        steps = await new.steps(h.id)

    assert info.value.error["type"] == "NonDeterminismError"
    assert calls == {"reserve": 1}  # neither the new step nor the compensation ran
    assert [(s.seq, s.name) for s in steps] == [(1, "reserve"), (2, "signal:approve")]


def _pricing(
    app: flowdesk.App, calls: Counter[str], seen: list[tuple[str, int]], max_version: int | None
) -> None:
    """``max_version=None`` is the code before the change; otherwise the guarded change."""

    @app.step(name="price_v1")
    async def price_v1(sku: str) -> int:
        calls["price_v1"] += 1
        return 100

    @app.step(name="price_v2")
    async def price_v2(sku: str) -> int:
        calls["price_v2"] += 1
        return 90

    @app.step(name="price_v3")
    async def price_v3(sku: str) -> int:
        calls["price_v3"] += 1
        return 80

    @app.workflow("pricing")
    async def pricing(ctx: flowdesk.Context, sku: str) -> dict[str, Any]:
        if max_version is None:
            version = -1
            price = await ctx.step(price_v1, sku)
        else:
            version = ctx.version("new-pricing", max_version)
            seen.append((ctx.run_id, version))
            if version == 0:
                price = await ctx.step(price_v1, sku)
            elif version == 2:
                price = await ctx.step(price_v2, sku)
            else:
                price = await ctx.step(price_v3, sku)
        await ctx.wait_signal("go")
        await ctx.wait_signal("go2")
        return {"price": price, "version": version}


async def test_version_keeps_old_runs_on_the_old_branch(make_app, wait_until, query):
    calls: Counter[str] = Counter()
    seen: list[tuple[str, int]] = []

    async def waiting_on(app: flowdesk.App, run_id: str, name: str) -> None:
        async def check() -> bool:
            run = await app.get_run(run_id)
            return run.status is RunStatus.WAITING and run.waiting_for == [name]

        await wait_until(check, what=f"{run_id} waits for {name}")

    # Old code: a run starts and waits.
    v1 = make_app()
    _pricing(v1, calls, seen, max_version=None)
    async with v1, v1.worker(concurrency=2):
        old = await v1.start("pricing", {"sku": "A"})
        await waiting_on(v1, old.id, "go")
    assert calls == {"price_v1": 1}

    # The change is deployed, guarded by ctx.version; a new run starts under it.
    v2 = make_app()
    _pricing(v2, calls, seen, max_version=2)
    async with v2, v2.worker(concurrency=2):
        new = await v2.start("pricing", {"sku": "A"})
        await waiting_on(v2, new.id, "go")
        # Both resume (a replay each) and park again.
        await v2.signal(old.id, "go")
        await v2.signal(new.id, "go")
        await waiting_on(v2, old.id, "go2")
        await waiting_on(v2, new.id, "go2")

    assert calls == {"price_v1": 1, "price_v2": 1}
    assert sorted(query("SELECT run_id, change_id, version FROM versions")) == sorted(
        [(old.id, "new-pricing", 0), (new.id, "new-pricing", 2)]
    )

    # A later change raises the maximum; both runs keep their recorded versions.
    v3 = make_app()
    _pricing(v3, calls, seen, max_version=3)
    async with v3, v3.worker(concurrency=2):
        await v3.signal(old.id, "go2")
        await v3.signal(new.id, "go2")
        old_out = await v3.result(old.id, timeout=10)
        new_out = await v3.result(new.id, timeout=10)
        third = await v3.start("pricing", {"sku": "A"})
        await waiting_on(v3, third.id, "go")
        await v3.cancel(third.id)

    assert old_out == {"price": 100, "version": 0}
    assert new_out == {"price": 90, "version": 2}
    assert calls == {"price_v1": 1, "price_v2": 1, "price_v3": 1}  # only the third run's
    assert [v for rid, v in seen if rid == old.id] == [0, 0]
    assert [v for rid, v in seen if rid == new.id] == [2, 2, 2]
    assert [v for rid, v in seen if rid == third.id] == [3]


async def test_version_is_recorded_even_when_the_run_finishes_at_once(app, query):
    @app.workflow("flagged")
    async def flagged(ctx: flowdesk.Context) -> list[int]:
        return [ctx.version("a", 1), ctx.version("b", 5, min_version=2), ctx.version("a", 9)]

    async with app, app.worker(concurrency=2):
        h = await app.start("flagged")
        assert await app.result(h.id, timeout=10) == [1, 5, 1]
    assert sorted(query("SELECT change_id, version FROM versions WHERE run_id = ?", (h.id,))) == [
        ("a", 1),
        ("b", 5),
    ]


async def test_replaying_a_deterministic_workflow_many_times_is_stable(app, wait_until):
    """Many waits, each followed by a replay of everything before it."""
    calls: Counter[int] = Counter()

    @app.step(name="work")
    async def work(i: int) -> int:
        calls[i] += 1
        await asyncio.sleep(0)
        return i * i

    @app.workflow("long")
    async def long(ctx: flowdesk.Context, rounds: int) -> int:
        total = 0
        for i in range(rounds):
            total += await ctx.step(work, i)
            total += await ctx.wait_signal("next")
        return total

    async with app, app.worker(concurrency=2):
        h = await app.start("long", {"rounds": 8})
        for i in range(8):

            async def parked(i: int = i) -> bool:
                steps = await app.steps(h.id)
                return len(steps) == 2 * i + 2 and steps[-1].status == "pending"

            await wait_until(parked, what=f"round {i}")
            await app.signal(h.id, "next", 1)
        assert await app.result(h.id, timeout=10) == sum(i * i for i in range(8)) + 8
    assert calls == {i: 1 for i in range(8)}


async def test_a_workflow_that_now_returns_before_its_recorded_calls_fails(
    make_app, wait_status
):
    """New code that stops earlier than the history it replays has changed under the run."""
    old = make_app()

    @old.step(name="one")
    async def one() -> int:
        return 1

    @old.step(name="two")
    async def two() -> int:
        return 2

    @old.workflow("shrinks")
    async def shrinks(ctx: flowdesk.Context) -> int:
        total = await ctx.step(one) + await ctx.step(two)
        await ctx.wait_signal("go")
        return total

    async with old, old.worker():
        h = await old.start("shrinks")
        await wait_status(old, h.id, RunStatus.WAITING)

    new = make_app()

    @new.step(name="one")
    async def one_again() -> int:
        return 1

    @new.workflow("shrinks")
    async def shrunk(ctx: flowdesk.Context) -> int:
        return await ctx.step(one_again)

    async with new, new.worker():
        await new.signal(h.id, "go")
        run = await new.wait(h.id, timeout=10)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert run.error["type"] == "NonDeterminismError"
    assert "two" in run.error["message"] and "returned" in run.error["message"]
