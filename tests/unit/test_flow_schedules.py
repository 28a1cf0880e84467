"""Cron schedules: one run per tick across workers, catch-up after downtime, pause and
resume, changed expressions, and what a schedule refuses."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus
from flowdesk.errors import ConfigurationError

EVERY_SECOND = "* * * * * */1"


def _tick_ms(scheduled_at: str) -> int:
    return round(datetime.fromisoformat(scheduled_at).timestamp() * 1000)


def _register(app: flowdesk.App, executed: list[int], catchup: str = "skip") -> None:
    @app.step(name="tick")
    async def tick(scheduled_at: str) -> int:
        executed.append(_tick_ms(scheduled_at))
        return _tick_ms(scheduled_at)

    @app.workflow("heartbeat", schedule=EVERY_SECOND, catchup=catchup)
    async def heartbeat(ctx: flowdesk.Context, scheduled_at: str) -> int:
        return await ctx.step(tick, scheduled_at)


def _scheduled_runs(
    query: Any, reveal: Any, name: str = "heartbeat"
) -> list[tuple[str, int, str, int]]:
    """(id, tick, status, created_at) of every run the schedule started, by tick (inputs
    are sealed at rest: ``reveal`` opens them)."""
    rows = query(
        "SELECT id, idempotency_key, input, status, created_at FROM runs WHERE workflow = ?",
        (name,),
    )
    out = []
    for run_id, key, raw_input, status, created in rows:
        prefix, sched, tick = key.split(":")
        assert (prefix, sched) == ("schedule", name)
        # The key names the tick, and the input carries the same instant.
        assert _tick_ms(reveal(run_id, 0, "input", raw_input)["scheduled_at"]) == int(tick)
        out.append((run_id, int(tick), status, created))
    return sorted(out, key=lambda r: r[1])


def _set_next_tick(execute: Any, name: str, next_tick: int) -> None:
    changed = execute("UPDATE schedules SET next_tick = ? WHERE name = ?", (next_tick, name))
    assert changed == 1


def _consecutive_seconds(ticks: list[int]) -> bool:
    return all(b - a == 1000 for a, b in zip(ticks, ticks[1:], strict=False))


async def test_one_run_per_tick_with_two_workers(make_app, query, reveal, wait_until):
    executed: list[int] = []
    apps = [make_app(), make_app()]
    for a in apps:
        _register(a, executed)
    first, second = apps
    async with first, second:
        async with first.worker(concurrency=10), second.worker(concurrency=10):
            await wait_until(
                lambda: len(set(executed)) >= 3, timeout=10, what="three ticks have run"
            )
        records = await first.schedules()
    runs = _scheduled_runs(query, reveal)
    ticks = [r[1] for r in runs]
    assert len(ticks) >= 3
    assert len(set(ticks)) == len(ticks)  # one run per tick
    assert all(t % 1000 == 0 for t in ticks)
    assert _consecutive_seconds(ticks)  # and no tick was skipped
    # Every run that finished executed its step once; none executed twice.
    done = [r[1] for r in runs if r[2] == "succeeded"]
    assert sorted(executed) == done
    assert len(records) == 1 and records[0].name == "heartbeat"
    assert records[0].cron == EVERY_SECOND and not records[0].paused
    assert records[0].last_tick is not None
    assert round(records[0].last_tick.timestamp() * 1000) == max(ticks)


async def _stop_after_sync(app: flowdesk.App, wait_until: Any) -> None:
    """Run a worker just long enough to store the app's schedule, then stop everything."""
    async with app.worker():
        await wait_until(app.schedules, what="the schedule is stored")


@pytest.mark.parametrize("catchup", ["all", "skip"])
async def test_catchup_after_downtime(app, execute, query, reveal, wait_until, catchup):
    executed: list[int] = []
    _register(app, executed, catchup=catchup)
    async with app:
        await _stop_after_sync(app, wait_until)
        before = {r[1] for r in _scheduled_runs(query, reveal)}
        # Everything was down for a while: the stored next tick is 5 s in the past.
        missed_from = (int(time.time()) - 5) * 1000
        assert all(t < missed_from for t in before)
        _set_next_tick(execute, "heartbeat", missed_from)

        async with app.worker(concurrency=20):

            def fired() -> list[tuple[str, int, str, int]]:
                return [r for r in _scheduled_runs(query, reveal) if r[1] >= missed_from]

            await wait_until(fired, what="the schedule fires after the downtime")
            first_fire = min(r[3] for r in fired())
            # The first fire after the downtime: the runs it created share its instant.
            catch_up = [r for r in fired() if r[3] == first_fire]
            for run_id, *_ in catch_up:
                await app.result(run_id, timeout=10)

    latest_missed = first_fire - first_fire % 1000
    assert latest_missed - missed_from >= 5000
    caught = [r[1] for r in catch_up]
    if catchup == "all":
        # Every missed second, from the stored next tick up to the fire, at once.
        assert caught == list(range(missed_from, latest_missed + 1, 1000))
        assert len(caught) >= 6
    else:
        # Only the latest missed tick.
        assert caught == [latest_missed]
        assert not [
            t for r in _scheduled_runs(query, reveal) if missed_from <= (t := r[1]) < latest_missed
        ]
    assert sorted(executed) == sorted(
        {r[1] for r in _scheduled_runs(query, reveal) if r[2] == "succeeded"}
    )
    assert Counter(executed).most_common(1)[0][1] == 1


async def test_pause_and_resume(app, query, reveal, wait_until):
    executed: list[int] = []
    _register(app, executed)
    async with app, app.worker(concurrency=10):
        await wait_until(lambda: executed, timeout=5, what="a first tick ran")
        await app.pause_schedule("heartbeat")
        paused_at = int(time.time() * 1000)
        (record,) = await app.schedules()
        assert record.paused and record.name == "heartbeat"
        runs_at_pause = _scheduled_runs(query, reveal)
        await asyncio.sleep(1.3)  # at least one tick passes while paused
        assert [r[:2] for r in _scheduled_runs(query, reveal)] == [r[:2] for r in runs_at_pause], (
            "a paused schedule started a run"
        )
        assert (await app.schedules())[0].paused

        resumed_at = int(time.time() * 1000)
        await app.resume_schedule("heartbeat")
        (record,) = await app.schedules()
        assert not record.paused
        assert round(record.next_tick.timestamp() * 1000) > resumed_at
        await wait_until(
            lambda: len(_scheduled_runs(query, reveal)) >= len(runs_at_pause) + 2,
            timeout=5,
            what="two ticks after resuming",
        )
    ticks = [r[1] for r in _scheduled_runs(query, reveal)]
    old = [r[1] for r in runs_at_pause]
    new = ticks[len(old) :]
    assert ticks[: len(old)] == old
    assert max(old) <= paused_at
    # No backfill of the paused period: the first tick after resuming is after the resume.
    assert min(new) > resumed_at
    assert not [t for t in ticks if max(old) < t <= resumed_at]
    assert _consecutive_seconds(new)


async def test_unknown_schedule_cannot_be_paused_or_resumed(app):
    _register(app, [])
    async with app:
        with pytest.raises(flowdesk.errors.NotFound):
            await app.pause_schedule("nope")
        with pytest.raises(flowdesk.errors.NotFound):
            await app.resume_schedule("nope")


async def test_changed_cron_replaces_the_stored_one(make_app, query, wait_until):
    old_app = make_app()

    @old_app.workflow("report", schedule="0 3 1 1 *")  # once a year
    async def old_report(ctx: flowdesk.Context, scheduled_at: str = "") -> str:
        return "old"

    async with old_app:
        await _stop_after_sync(old_app, wait_until)
        (record,) = await old_app.schedules()
        assert record.cron == "0 3 1 1 *"
        assert record.next_tick.timestamp() > time.time() + 60

    new_app = make_app()

    @new_app.workflow("report", schedule=EVERY_SECOND)
    async def new_report(ctx: flowdesk.Context, scheduled_at: str = "") -> str:
        return "new"

    async with new_app, new_app.worker():
        await wait_until(
            lambda: query("SELECT id FROM runs WHERE workflow = 'report'"),
            timeout=5,
            what="the new expression fires",
        )
        (record,) = await new_app.schedules()
        assert record.cron == EVERY_SECOND
        assert record.next_tick.timestamp() < time.time() + 2
        (run_id,) = query("SELECT id FROM runs WHERE workflow = 'report' LIMIT 1")[0]
        assert await new_app.result(run_id, timeout=5) == "new"


async def test_unchanged_cron_keeps_its_next_tick(make_app, execute, wait_until):
    first = make_app()

    @first.workflow("report", schedule="0 3 1 1 *")
    async def report(ctx: flowdesk.Context, scheduled_at: str = "") -> None:
        return None

    async with first:
        await _stop_after_sync(first, wait_until)
        stored = (await first.schedules())[0].next_tick
        # A worker restarting with the same expression must not move the tick (that would
        # lose a tick that was due, or fire one twice).
        _set_next_tick(execute, "report", round(stored.timestamp() * 1000) + 1000)
        await _stop_after_sync(first, wait_until)
        assert (
            round((await first.schedules())[0].next_tick.timestamp() * 1000)
            == round(stored.timestamp() * 1000) + 1000
        )


def test_invalid_cron_is_refused(tmp_path):
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(ConfigurationError, match="cron"):

        @app.workflow("bad", schedule="every tuesday")
        async def bad(ctx: flowdesk.Context) -> None: ...

    with pytest.raises(ConfigurationError, match="catchup"):

        @app.workflow("bad2", schedule=EVERY_SECOND, catchup="some")
        async def bad2(ctx: flowdesk.Context) -> None: ...

    assert "bad" not in app.registry.workflows and "bad2" not in app.registry.workflows
    assert app.schedule_defs == {}


def test_scheduled_workflow_with_a_required_input_is_refused(tmp_path):
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(ConfigurationError, match="customer_id"):

        @app.workflow("needs_input", schedule=EVERY_SECOND)
        async def needs_input(ctx: flowdesk.Context, customer_id: str) -> None: ...

    assert "needs_input" not in app.registry.workflows
    assert app.schedule_defs == {}

    # Defaults, and a required `scheduled_at` (the schedule passes it), are fine.
    @app.workflow("fine", schedule=EVERY_SECOND)
    async def fine(ctx: flowdesk.Context, scheduled_at: str, limit: int = 10) -> None: ...

    assert "fine" in app.schedule_defs


async def test_scheduled_runs_get_the_workflow_timeout(app, query, wait_until):
    @app.workflow("slow_tick", schedule=EVERY_SECOND, timeout=30)
    async def slow_tick(ctx: flowdesk.Context) -> None:
        return None

    async with app, app.worker():
        rows = await wait_until(
            lambda: query("SELECT id, created_at, deadline_at FROM runs"),
            timeout=5,
            what="a tick",
        )
        run_id, created, deadline = rows[0]
        assert deadline == created + 30_000
        await app.result(run_id, timeout=5)
        assert (await app.get_run(run_id)).status is RunStatus.SUCCEEDED
