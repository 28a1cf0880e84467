"""Deduplicated and debounced starts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus
from flowdesk.errors import ConfigurationError


def _ms(when: Any) -> int:
    return round(when.timestamp() * 1000)


def _register(app: flowdesk.App, executed: list[tuple[str, int, float]]) -> asyncio.Event:
    """Registers ``sync_customer``; returns the event a blocking run waits for."""
    release = asyncio.Event()

    @app.step(name="sync")
    async def sync(customer: str, version: int, block: bool) -> int:
        executed.append((customer, version, time.time()))
        if block:
            await release.wait()
        return version

    @app.workflow("sync_customer")
    async def sync_customer(
        ctx: flowdesk.Context, customer: str, version: int, block: bool = False
    ) -> int:
        return await ctx.step(sync, customer, version, block)

    return release


async def test_dedupe_returns_the_queued_run(app):
    executed: list[tuple[str, int, float]] = []
    _register(app, executed)
    async with app:
        first = await app.start(
            "sync_customer", {"customer": "c7", "version": 1}, dedupe_key="c7", delay=30
        )
        again = await app.start(
            "sync_customer", {"customer": "c7", "version": 2}, dedupe_key="c7", delay=30
        )
        assert first.created and not again.created
        assert again.id == first.id
        run = await app.get_run(first.id)
        # Without debounce the queued run keeps its input and its due time.
        assert run.input == {"customer": "c7", "version": 1, "block": False}
        other_key = await app.start(
            "sync_customer", {"customer": "c8", "version": 1}, dedupe_key="c8", delay=30
        )
        no_key = await app.start("sync_customer", {"customer": "c7", "version": 3}, delay=30)
        assert other_key.created and other_key.id != first.id
        assert no_key.created and no_key.id != first.id
        assert len((await app.list_runs(workflow="sync_customer")).items) == 3
        assert executed == []


async def test_dedupe_key_of_a_started_run_starts_a_new_one(app, wait_until):
    executed: list[tuple[str, int, float]] = []
    release = _register(app, executed)
    async with app, app.worker(concurrency=10):
        first = await app.start(
            "sync_customer", {"customer": "c1", "version": 1, "block": True}, dedupe_key="c1"
        )
        await wait_until(lambda: executed, what="the first run is executing")
        assert (await app.get_run(first.id)).status is RunStatus.RUNNING
        second = await app.start("sync_customer", {"customer": "c1", "version": 2}, dedupe_key="c1")
        assert second.created and second.id != first.id
        release.set()
        assert await first.result(timeout=10) == 1
        assert await second.result(timeout=10) == 2
        # Finished runs are not matched either.
        third = await app.start("sync_customer", {"customer": "c1", "version": 3}, dedupe_key="c1")
        assert third.created and third.id not in (first.id, second.id)
        assert await third.result(timeout=10) == 3
    assert [(c, v) for c, v, _ in executed] == [("c1", 1), ("c1", 2), ("c1", 3)]


async def test_dedupe_does_not_match_a_started_run_that_is_queued_again(app, wait_status):
    """A run that started, waited, and was woken is queued again; it is not "still queued"
    for dedupe: a new start must not be folded into it (nor, with debounce, replace the
    input of a run that is half done)."""
    steps: list[int] = []

    @app.step(name="part")
    async def part(version: int) -> int:
        steps.append(version)
        return version

    @app.workflow("two_part")
    async def two_part(ctx: flowdesk.Context, version: int) -> list[int]:
        a = await ctx.step(part, version)
        await ctx.wait_signal("continue")
        b = await ctx.step(part, version)
        return [a, b]

    async with app:
        async with app.worker():
            first = await app.start("two_part", {"version": 1}, dedupe_key="k")
            await wait_status(app, first.id, RunStatus.WAITING)
        await app.signal(first.id, "continue")  # no worker: the run is queued again
        assert (await app.get_run(first.id)).status is RunStatus.QUEUED
        second = await app.start("two_part", {"version": 2}, dedupe_key="k", debounce=0.05)
        assert second.created and second.id != first.id
        assert (await app.get_run(first.id)).input == {"version": 1}
        async with app.worker():
            assert await first.result(timeout=10) == [1, 1]
            await app.signal(second.id, "continue")
            assert await second.result(timeout=10) == [2, 2]
    # Each run executed each of its steps once, with its own input.
    assert sorted(steps) == [1, 1, 2, 2]


async def test_debounce_pushes_the_run_back_and_the_last_input_wins(app):
    executed: list[tuple[str, int, float]] = []
    _register(app, executed)
    async with app, app.worker(concurrency=10):
        handles = []
        due: list[int] = []
        last_start = 0.0
        for version in range(1, 5):
            last_start = time.time()
            h = await app.start(
                "sync_customer",
                {"customer": "c9", "version": version},
                dedupe_key="c9",
                debounce=0.4,
            )
            handles.append(h)
            run = await app.get_run(h.id)
            assert run.status is RunStatus.QUEUED
            due.append(_ms(run.due_at))
            assert _ms(run.due_at) >= int(last_start * 1000) + 400
            await asyncio.sleep(0.1)
        assert handles[0].created
        assert [h.created for h in handles[1:]] == [False, False, False]
        assert {h.id for h in handles} == {handles[0].id}
        assert due == sorted(due) and len(set(due)) == 4  # each start pushed it back
        assert executed == []  # 0.3 s after the first start: still waiting
        assert await handles[0].result(timeout=10) == 4
        run = await app.get_run(handles[0].id)
        assert run.input == {"customer": "c9", "version": 4, "block": False}
        assert (await app.list_runs(workflow="sync_customer")).items == [run]
    assert [(c, v) for c, v, _ in executed] == [("c9", 4)]
    # It ran no earlier than the debounce after the last start (1 ms for rounding).
    assert executed[0][2] >= last_start + 0.4 - 0.001


async def test_debounce_needs_a_dedupe_key(app):
    _register(app, [])
    async with app:
        with pytest.raises(ConfigurationError, match="dedupe_key"):
            await app.start("sync_customer", {"customer": "x", "version": 1}, debounce=1)
        assert (await app.list_runs()).items == []


async def test_dedupe_key_is_per_workflow(app):
    _register(app, [])

    @app.workflow("other")
    async def other(ctx: flowdesk.Context) -> None:
        return None

    async with app:
        a = await app.start(
            "sync_customer", {"customer": "x", "version": 1}, dedupe_key="shared", delay=30
        )
        b = await app.start("other", dedupe_key="shared", delay=30)
        assert a.created and b.created and a.id != b.id
