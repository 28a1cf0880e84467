"""Queue limits: global concurrency, per-key concurrency, start rate, priorities, and
recovery of an expired lease in a full queue."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

import flowdesk
from flowdesk import RunStatus

Interval = tuple[float, float]


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def max_overlap(intervals: Iterable[Interval]) -> int:
    """The largest number of intervals open at one instant (an end at t closes before a
    start at t opens)."""
    events: list[tuple[float, int]] = []
    for start, end in intervals:
        assert start <= end
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    open_now = peak = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def most_in_window(times: Iterable[float], window: float) -> int:
    """The largest number of ``times`` in any half-open window ``(t - window, t]``."""
    ordered = sorted(times)
    best = 0
    lo = 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_helpers_measure_what_they_claim():
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_overlap([(0, 2), (1, 3), (1.5, 1.6)]) == 3
    assert most_in_window([0, 999, 1000, 1001], 1000) == 3
    assert most_in_window([0, 1000, 2000], 1000) == 1


def _register_busy(app: flowdesk.App, spans: list[Interval], queue: str) -> None:
    @app.step(name="busy")
    async def busy(i: int) -> int:
        start = time.monotonic()
        await asyncio.sleep(0.15)
        spans.append((start, time.monotonic()))
        return i

    @app.workflow("busy", queue=queue)
    async def wf(ctx: flowdesk.Context, i: int) -> int:
        return await ctx.step(busy, i)


# -- global concurrency ------------------------------------------------------------------


async def test_queue_concurrency_holds_with_one_wide_worker(app):
    spans: list[Interval] = []
    app.queue("narrow", concurrency=3)
    _register_busy(app, spans, "narrow")

    async with app:
        handles = [await app.start("busy", {"i": i}) for i in range(12)]
        async with app.worker(concurrency=50):
            results = [await h.result(timeout=20) for h in handles]
    assert results == list(range(12))
    assert len(spans) == 12
    assert max_overlap(spans) == 3  # never above the limit, and the limit was reached


async def test_queue_concurrency_holds_across_two_workers(make_app):
    spans: list[Interval] = []
    apps = [make_app(), make_app()]
    for a in apps:
        a.queue("narrow", concurrency=3)
        _register_busy(a, spans, "narrow")
    first, second = apps

    async with first, second:
        handles = [await first.start("busy", {"i": i}) for i in range(12)]
        # Each worker holds at most 2 runs, so 3 at once needs both workers: the limit of
        # 3 (below their joint 4 slots) is what the store must hold across them.
        async with first.worker(concurrency=2) as w1, second.worker(concurrency=2) as w2:
            results = [await h.result(timeout=20) for h in handles]
        assert w1.claimed_total > 0 and w2.claimed_total > 0
        assert w1.claimed_total + w2.claimed_total == 12
    assert results == list(range(12))
    assert len(spans) == 12
    assert max_overlap(spans) == 3


# -- per-key concurrency -----------------------------------------------------------------


async def test_per_key_concurrency_from_start_argument(app):
    spans: dict[str | None, list[Interval]] = defaultdict(list)
    app.queue("keyed", per_key_concurrency=1)

    @app.step(name="work")
    async def work(key: str | None) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.12)
        spans[key].append((start, time.monotonic()))

    @app.workflow("keyed", queue="keyed")
    async def keyed(ctx: flowdesk.Context, key: str | None, i: int) -> None:
        await ctx.step(work, key)

    async with app:
        handles = []
        for i in range(4):
            for key in ("a", "b", None):
                handles.append(await app.start("keyed", {"key": key, "i": i}, concurrency_key=key))
        async with app.worker(concurrency=50):
            for h in handles:
                await h.result(timeout=20)
        keys = {
            (await app.get_run(h.id)).input["key"]: (await app.get_run(h.id)).concurrency_key
            for h in handles
        }
    assert keys == {"a": "a", "b": "b", None: None}
    assert [len(spans[k]) for k in ("a", "b", None)] == [4, 4, 4]
    assert max_overlap(spans["a"]) == 1
    assert max_overlap(spans["b"]) == 1
    # Different keys run side by side, and runs without a key are not limited at all.
    assert max_overlap(spans["a"] + spans["b"]) == 2
    assert max_overlap(spans[None]) == 4


async def test_per_key_concurrency_from_the_workflow_key_field(app):
    spans: dict[str, list[Interval]] = defaultdict(list)
    app.queue("per-customer", per_key_concurrency=1)

    @app.step(name="bill")
    async def bill(customer: str) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.12)
        spans[customer].append((start, time.monotonic()))

    @app.workflow("bill", queue="per-customer", key="customer")
    async def bill_wf(ctx: flowdesk.Context, customer: str, n: int) -> None:
        await ctx.step(bill, customer)

    async with app:
        handles = [
            await app.start("bill", {"customer": c, "n": n}) for n in range(4) for c in "xyz"
        ]
        assert {(await app.get_run(h.id)).concurrency_key for h in handles} == {"x", "y", "z"}
        async with app.worker(concurrency=50):
            for h in handles:
                await h.result(timeout=20)
    for customer in "xyz":
        assert len(spans[customer]) == 4
        assert max_overlap(spans[customer]) == 1
    assert max_overlap([s for c in "xyz" for s in spans[c]]) == 3


# -- start rate --------------------------------------------------------------------------


async def test_rate_limits_first_starts_per_window(make_app):
    # Two apps on one file, each with a wide worker: the rate holds across both.
    step_starts: list[float] = []
    apps = [make_app(), make_app()]
    for a in apps:
        a.queue("metered", rate=(5, 1.0))

        @a.step(name="metered")
        async def metered(i: int) -> int:
            step_starts.append(time.time())
            return i

        @a.workflow("metered", queue="metered")
        async def wf(ctx: flowdesk.Context, i: int) -> int:
            return await ctx.step(metered, i)

    first, second = apps
    async with first, second:
        handles = [await first.start("metered", {"i": i}) for i in range(12)]
        async with first.worker(concurrency=50), second.worker(concurrency=50):
            results = [await h.result(timeout=20) for h in handles]
        runs = [await first.get_run(h.id) for h in handles]
    assert results == list(range(12))
    started = [_ms(r.started_at) for r in runs if r.started_at is not None]
    assert len(started) == 12
    # The claim times the store recorded: at most 5 in any 1 s window, and the limit was
    # reached (so the runs did not just happen to trickle in).
    assert most_in_window(started, 1000) == 5
    # Across 12 starts, 3 windows are needed: the last start is at least 2 windows after
    # the first.
    assert max(started) - min(started) >= 2000
    # The steps themselves begin a little after their claim; their times, seen through a
    # slightly narrower window, agree.
    assert len(step_starts) == 12
    assert most_in_window(step_starts, 0.95) <= 5


# -- priorities --------------------------------------------------------------------------


async def test_priority_orders_runs_waiting_for_a_full_queue(app, wait_until):
    order: list[str] = []
    release = asyncio.Event()
    app.queue("single", concurrency=1)

    @app.step(name="job")
    async def job(label: str, block: bool) -> None:
        order.append(label)
        if block:
            await release.wait()

    @app.workflow("job", queue="single")
    async def wf(ctx: flowdesk.Context, label: str, block: bool = False) -> str:
        await ctx.step(job, label, block)
        return label

    async with app, app.worker(concurrency=10):
        blocker = await app.start("job", {"label": "blocker", "block": True})
        await wait_until(lambda: order == ["blocker"], what="the blocker holds the slot")
        handles = []
        for label, priority in [
            ("p0-first", 0),
            ("p5-first", 5),
            ("p1", 1),
            ("p5-second", 5),
            ("p-1", -1),
            ("p0-second", 0),
        ]:
            handles.append(await app.start("job", {"label": label}, priority=priority))
            await asyncio.sleep(0.01)  # distinct due times for the ties
        await asyncio.sleep(0.2)  # several claim attempts while the slot is taken
        assert order == ["blocker"]
        statuses = {(await app.get_run(h.id)).status for h in handles}
        assert statuses == {RunStatus.QUEUED}
        release.set()
        await blocker.result(timeout=10)
        for h in handles:
            await h.result(timeout=10)
    assert order == ["blocker", "p5-first", "p5-second", "p1", "p0-first", "p0-second", "p-1"]


# -- lease recovery ----------------------------------------------------------------------


async def test_expired_lease_in_a_full_queue_is_claimed_again(app):
    spans: dict[str, Interval] = {}
    app.queue("solo", concurrency=1)

    @app.step(name="solo")
    async def solo(name: str) -> str:
        start = time.time()
        await asyncio.sleep(0.05)
        spans[name] = (start, time.time())
        return name

    @app.workflow("solo", queue="solo")
    async def wf(ctx: flowdesk.Context, name: str) -> str:
        return await ctx.step(solo, name)

    async with app:
        orphan = await app.start("solo", {"name": "orphan"})
        # A worker that claimed the run and died: its lease runs out after 300 ms, and
        # until then it fills the queue's only slot.
        claimed = await app.store.claim("ghost", ["solo"], ["solo"], 5, 300, app.queues)
        assert [c.id for c in claimed] == [orphan.id]
        held = await app.get_run(orphan.id)
        assert held.status is RunStatus.RUNNING and held.lease_owner == "ghost"
        assert held.due_at is not None
        lease_expiry = held.due_at.timestamp()
        other = await app.start("solo", {"name": "other"})
        # While the lease holds, the slot is taken: nothing else may be claimed.
        assert await app.store.claim("ghost2", ["solo"], ["solo"], 5, 300, app.queues) == []

        async with app.worker(concurrency=10) as worker:
            assert await orphan.result(timeout=10) == "orphan"
            assert await other.result(timeout=10) == "other"
            recovered = await app.get_run(orphan.id)
            assert recovered.status is RunStatus.SUCCEEDED
            assert recovered.attempts == 2  # the ghost's claim, then this worker's
            assert worker.claimed_total == 2
    assert set(spans) == {"orphan", "other"}
    # The queued run did not start while the ghost's lease still filled the slot, and the
    # two never ran at once.
    assert spans["other"][0] >= lease_expiry - 0.001
    assert max_overlap(spans.values()) == 1
