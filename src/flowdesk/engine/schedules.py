"""Cron schedules: one run per tick, however many workers watch the schedule.

Every worker looks at the schedules that are due. Firing one is a single transaction: read
the schedule's next tick, start a run for each tick that is due (its idempotency key is
``schedule:<name>:<tick>``), and move the next tick past now. Transactions on one schedule
serialize, so a second worker finds nothing left to fire, and the key makes a tick's run
unique even if two got through.

Missed ticks (everything was down, or the schedule was paused) follow the schedule's
``catchup``: ``"skip"`` runs only the latest missed tick, ``"all"`` runs every one (at
most `MAX_BACKFILL`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from croniter import croniter

from flowdesk import errors
from flowdesk.store import base
from flowdesk.store.base import NewRun

if TYPE_CHECKING:
    from flowdesk.engine.app import App
    from flowdesk.engine.registry import WorkflowDef

Catchup = Literal["skip", "all"]
MAX_BACKFILL = 1000


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    workflow: str
    cron: str
    catchup: Catchup


def validate(name: str, cron: str, catchup: str, wdef: WorkflowDef) -> Schedule:
    if not croniter.is_valid(cron):
        raise errors.ConfigurationError(
            f"Workflow {name!r}: {cron!r} is not a cron expression (try '*/5 * * * *')."
        )
    if catchup not in ("skip", "all"):
        raise errors.ConfigurationError(
            f"Workflow {name!r}: catchup must be 'skip' or 'all', not {catchup!r}."
        )
    params = list(inspect.signature(wdef.fn).parameters.values())[1:]
    required = [
        p.name for p in params if p.default is inspect.Parameter.empty and p.name != "scheduled_at"
    ]
    if required:
        raise errors.ConfigurationError(
            f"Scheduled workflow {name!r} has required inputs {required}: a schedule can only "
            "pass `scheduled_at`. Give the others defaults."
        )
    return Schedule(name, wdef.name, cron, catchup)  # type: ignore[arg-type]


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def next_after(cron: str, ms: int) -> int:
    """The first tick strictly after ``ms`` (epoch ms)."""
    return int(croniter(cron, _dt(ms)).get_next(float) * 1000)


def due_ticks(cron: str, catchup: str, next_tick: int, now: int) -> tuple[list[int], int]:
    """The ticks to fire now (from ``next_tick`` up to ``now``), and the next tick after."""
    ticks: list[int] = []
    tick = next_tick
    while tick <= now and len(ticks) < MAX_BACKFILL:
        ticks.append(tick)
        tick = next_after(cron, tick)
    if len(ticks) >= MAX_BACKFILL:
        tick = next_after(cron, now)
    if catchup == "skip":
        ticks = ticks[-1:]
    return ticks, tick


async def sync(app: App) -> None:
    """Store the app's schedules (a changed cron restarts from its next tick)."""
    for schedule in app.schedule_defs.values():
        first = next_after(schedule.cron, base.now_ms())

        async def op(tx: base.Tx, s: Schedule = schedule, first: int = first) -> None:
            await tx.sync_schedule(s.name, s.workflow, s.cron, s.catchup, first)

        await app.writer.submit(op)


async def fire_due(app: App) -> list[str]:
    """Start the runs of every due schedule this app knows; returns their run ids."""
    started: list[str] = []
    for name in await app.store.due_schedules():
        schedule = app.schedule_defs.get(name)
        if schedule is None:
            continue  # another deployment's schedule
        started += await app.writer.submit(_fire_op(app, schedule))
    if started:
        app.wake()
    return started


def _fire_op(app: App, schedule: Schedule) -> base.Op:
    wdef = app.registry.workflow(schedule.workflow)
    takes_tick = "scheduled_at" in wdef.params

    async def op(tx: base.Tx) -> list[str]:
        record = await tx.get_schedule(schedule.name)
        if record is None or record.paused:
            return []
        next_tick = int(record.next_tick.timestamp() * 1000)
        if next_tick > tx.now:
            return []  # another worker fired it first
        ticks, following = due_ticks(schedule.cron, schedule.catchup, next_tick, tx.now)
        ids = []
        for tick in ticks:
            payload = {"scheduled_at": _dt(tick).isoformat()} if takes_tick else {}
            run_id, _ = await tx.create_run(
                NewRun(
                    id=app.new_run_id(),
                    workflow=schedule.workflow,
                    input=wdef.validate(payload),
                    queue=wdef.queue,
                    idempotency_key=f"schedule:{schedule.name}:{tick}",
                    created_at=tx.now,
                    deadline_at=None if wdef.timeout is None else tx.now + int(wdef.timeout * 1000),
                )
            )
            ids.append(run_id)
        await tx.advance_schedule(schedule.name, ticks[-1] if ticks else None, following)
        return ids

    return op
