"""The worker: claims due runs, replays them, renews their leases, gives them back on stop.

There is no coordinator. Every worker claims from the store in one atomic statement, and a
run whose worker died is claimed again by anyone once its lease expires: recovery is the
same path as normal work. A worker holds a coroutine only for runs that are executing; a
run that waits (sleep, signal, child) is parked in the store and costs nothing here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from flowdesk import codec, errors
from flowdesk.engine import context as context_mod
from flowdesk.engine import observe_port, schedules
from flowdesk.store.base import Claimed, Fenced, RunStatus, Tx
from flowdesk.store.people import Escalated

if TYPE_CHECKING:
    from flowdesk.engine.app import App

log = logging.getLogger("flowdesk.worker")

TIMEOUT_REASON = "the run passed its timeout"
TIMEOUT_ERROR = codec.encode({"type": "WorkflowTimeout", "message": TIMEOUT_REASON})

StopReason = Literal["cancel", "lease", "shutdown", "timeout"]
_ENDED: dict[RunStatus, observe_port.SegmentOutcome] = {
    RunStatus.SUCCEEDED: "succeeded",
    RunStatus.FAILED: "failed",
    RunStatus.CANCELLED: "cancelled",
}


class Worker:
    """Executes runs of an `App`'s workflows.

    Use ``await worker.run()`` (until `stop`), or ``async with app.worker():`` to run one in
    the background of a block. `stop` is idempotent and safe from any thread or signal
    handler.
    """

    def __init__(
        self,
        app: App,
        *,
        concurrency: int = 100,
        queues: Sequence[str] | None = None,
        grace_seconds: float = 10.0,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise errors.ConfigurationError("concurrency must be at least 1")
        self.app = app
        self.concurrency = concurrency
        self.queues = list(queues) if queues else None
        self.grace_seconds = grace_seconds
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop_reasons: dict[str, StopReason] = {}
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = threading.Event()
        self._started = time.time()
        self.claimed_total = 0
        self.finished_total = 0

    @property
    def in_flight(self) -> int:
        """Runs whose coroutine this worker holds right now."""
        return len(self._tasks)

    def holds(self, run_id: str) -> bool:
        return run_id in self._tasks

    # -- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop: it claims nothing more, lets running runs finish for up
        to ``grace_seconds``, then gives the rest back to the queue."""
        self._stop_requested.set()
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # loop already closed
                pass

    async def run(self) -> None:
        app = self.app
        await app.open()
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested.is_set():
            self._stopping.set()
        queues = self.queues or sorted({w.queue for w in app.registry.workflows.values()})
        workflows = sorted(app.registry.workflows)
        if not workflows:
            raise errors.ConfigurationError("The app has no workflows: nothing to work on.")
        app._attach(self)
        wake = app._wake_event()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="flowdesk-heartbeat")
        upkeep = asyncio.create_task(self._upkeep_loop(), name="flowdesk-upkeep")
        sides = [heartbeat, upkeep]
        listen = getattr(app.store, "listen", None)
        if listen is not None:  # wake at once when another process makes work due
            wanted = set(queues)
            sides.append(
                asyncio.create_task(
                    listen(lambda q: wake.set() if not q or q in wanted else None),
                    name="flowdesk-listen",
                )
            )
        try:
            await self._heartbeat_once()
            await schedules.sync(app)
            await self._claim_loop(queues, workflows, wake)
        finally:
            await self._drain()
            for side in sides:
                side.cancel()
                try:
                    await side
                except asyncio.CancelledError:
                    pass
            app._detach(self)
            try:
                await app.store.forget_worker(self.id)
            except Exception:  # the store may be gone; the row is informational only
                log.debug("could not remove worker row", exc_info=True)

    async def _claim_loop(
        self, queues: list[str], workflows: list[str], wake: asyncio.Event
    ) -> None:
        app = self.app
        assert self._stopping is not None
        stopping = self._stopping
        poll = app.poll_interval
        woken = True
        while not stopping.is_set():
            free = self.concurrency - len(self._tasks)
            got = 0
            try:
                if free > 0 and (woken or await app.store.has_due(queues, workflows)):
                    wake.clear()
                    claimed = await app.store.claim(
                        self.id, queues, workflows, free, app.lease_ms, app.queues
                    )
                    got = len(claimed)
                    for c in claimed:
                        self._launch(c)
            except Exception:  # the store is unreachable: keep polling until it is back
                log.exception("claiming failed; retrying in %.2f s", poll)
            if got and got == free:
                await asyncio.sleep(0)  # more may be due: claim again after a turn
                woken = True
                continue
            waiter = asyncio.ensure_future(wake.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            try:
                done, _ = await asyncio.wait(
                    {waiter, stopper}, timeout=poll, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
                stopper.cancel()
            woken = waiter in done

    def _launch(self, claimed: Claimed) -> None:
        current = self._tasks.get(claimed.id)
        if current is not None and not current.done() and claimed.id not in self._stop_reasons:
            # Our own lease had run out (the process was paused past it) and we claimed the
            # run again while its coroutine still runs here: the claim renewed the lease;
            # a second coroutine would execute the same steps twice under one owner.
            return
        self.claimed_total += 1
        task = asyncio.create_task(self._execute(claimed), name=f"flowdesk-run-{claimed.id}")
        self._tasks[claimed.id] = task
        task.add_done_callback(functools.partial(self._done, claimed.id))

    def _done(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(run_id) is task:
            del self._tasks[run_id]
            self._stop_reasons.pop(run_id, None)
        self.finished_total += 1
        self.app._wake_event().set()  # a slot is free

    def interrupt(self, run_id: str, reason: StopReason) -> bool:
        """Stop the coroutine of a run this worker holds (cancel, lost lease, shutdown)."""
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        self._stop_reasons.setdefault(run_id, reason)
        task.cancel()
        return True

    async def _drain(self) -> None:
        if not self._tasks:
            return
        pending = list(self._tasks.values())
        _, still = await asyncio.wait(pending, timeout=self.grace_seconds)
        for task in still:
            run_id = task.get_name().removeprefix("flowdesk-run-")
            self.interrupt(run_id, "shutdown")
        if still:
            await asyncio.wait(still, timeout=5)

    # -- heartbeats ------------------------------------------------------------------
    async def _heartbeat_once(self) -> None:
        executing = [run_id for run_id, task in self._tasks.items() if not task.done()]
        held, to_cancel = await self.app.store.heartbeat(
            self.id,
            executing,
            self.app.lease_ms,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues or ["*"],
                "concurrency": self.concurrency,
                "started_at": int(self._started * 1000),
            },
        )
        for run_id in executing:
            if run_id not in held:
                if await self._settled(run_id):
                    continue  # it parked or finished while the heartbeat was in flight
                log.warning("lost the lease of run %s; dropping it", run_id)
                self.interrupt(run_id, "lease")
            elif run_id in to_cancel:
                self.interrupt(run_id, "cancel")

    async def _settled(self, run_id: str) -> bool:
        run = await self.app.store.get_run(run_id)
        return run is not None and (run.status.finished or run.status is RunStatus.WAITING)

    async def _upkeep_loop(self) -> None:
        """Fire due schedules, and cancel queued or waiting runs past their deadline."""
        app = self.app
        last_overdue = 0.0
        while True:
            await asyncio.sleep(app.poll_interval)
            try:
                if app.schedule_defs:
                    await schedules.fire_due(app)
                if time.monotonic() - last_overdue >= 1.0:
                    last_overdue = time.monotonic()
                    await self._cancel_overdue()
                    await self._escalate_due()
                    for hook in app.upkeep_hooks:
                        await hook()
            except Exception:
                log.exception("schedule, deadline or escalation check failed; trying again")

    async def _escalate_due(self) -> None:
        """Fire the escalations whose time has come. The store applies each at most once
        (it checks the task's escalation level), whichever worker gets there first."""
        app = self.app
        for task_id, level in await app.store.due_escalations():
            done: Escalated | None = await app.submit(
                lambda tx, t=task_id, lv=level: tx.escalate_task(t, lv),  # type: ignore[misc]
                actor="system:escalation",
            )
            if done is None:
                continue
            app.wake()
            try:
                await app.notifier(done)
            except Exception:
                log.exception("notifier failed for the escalation of task %s", task_id)
            if app.observer is not None:
                try:
                    await app.observer.task_escalated(done)
                except Exception:
                    log.exception("observer failed for the escalation of task %s", task_id)

    async def _cancel_overdue(self) -> None:
        async def op(tx: Tx) -> list[str]:
            ids = await tx.overdue(100)
            for run_id in ids:
                await tx.cancel(run_id, TIMEOUT_REASON, "WorkflowTimeout")
            return ids

        ids: list[str] = await self.app.writer.submit(op)
        for run_id in ids:
            self.app._finished(run_id)
        if ids and self.app.observer is not None:
            await self.app.observer.runs_ended(ids, RunStatus.CANCELLED)

    async def _heartbeat_loop(self) -> None:
        interval = self.app.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat_once()
            except Exception:
                log.exception("heartbeat failed; retrying in %.1f s", interval)

    # -- one run ---------------------------------------------------------------------
    async def _execute(self, claimed: Claimed) -> None:
        ctx = context_mod.Context(
            self.app,
            claimed.id,
            claimed.workflow,
            self.id,
            claimed.attempts,
            claimed.history,
            claimed.versions,
        )
        observer = self.app.observer
        if observer is None:
            await self._segment(claimed, ctx)
            return
        segment = observe_port.Segment(ctx, claimed, self.id)
        state = None
        try:
            state = await observer.segment_started(segment)
        except Exception:
            log.exception("observer failed at the start of run %s; running it anyway", claimed.id)
        outcome: observe_port.SegmentOutcome = "lost"
        try:
            outcome = await self._segment(claimed, ctx)
        finally:
            try:
                observer.segment_ended(segment, state, outcome)
            except Exception:
                log.exception("observer failed at the end of run %s", claimed.id)

    async def _segment(
        self, claimed: Claimed, ctx: context_mod.Context
    ) -> observe_port.SegmentOutcome:
        """Execute the run from its claim to its end or its next wait; says how it ended."""
        app = self.app
        run_id = claimed.id
        wdef = app.registry.workflows[claimed.workflow]
        status: RunStatus
        output: str | None = None
        error: str | None = None
        failed_seq: int | None = None
        timer: asyncio.TimerHandle | None = None
        overdue = False
        if claimed.deadline_at is not None:
            left = claimed.deadline_at / 1000 - time.time()
            if left <= 0:
                overdue = True
            else:
                timer = asyncio.get_running_loop().call_later(
                    left, self.interrupt, run_id, "timeout"
                )
        try:
            if claimed.cancel_requested:
                raise context_mod.Cancelled()
            if overdue:
                # Claimed past its deadline (a waiting run falls due at it): end it here.
                # Replaying it first could park it again before a timer cancelled it, and
                # it would be claimed over and over until the sweep of overdue runs.
                self._stop_reasons.setdefault(run_id, "timeout")
                raise asyncio.CancelledError
            kwargs = wdef.kwargs(claimed.input)
            result = await wdef.fn(ctx, **kwargs)
            if ctx.nondeterminism is not None:  # the workflow caught it; the run still fails
                raise ctx.nondeterminism
            ctx.check_history_consumed()
            output = codec.encode(result, f"result of workflow {wdef.name!r}")
            status = RunStatus.SUCCEEDED
        except errors.Suspended:
            return "suspended"
        except errors.LeaseLost:
            return "lost"
        except context_mod.Cancelled:
            status = RunStatus.CANCELLED
        except asyncio.CancelledError:
            reason = self._stop_reasons.get(run_id, "shutdown")
            if reason == "cancel":
                status = RunStatus.CANCELLED
            elif reason == "timeout":
                status = RunStatus.CANCELLED
                error = TIMEOUT_ERROR
            elif reason == "shutdown":
                await self._release(run_id)
                return "released"
            else:
                return "lost"
        except Exception as raised:
            exc = ctx.nondeterminism or raised
            status = RunStatus.FAILED
            failed_seq = ctx.failed_seq(exc)
            error = codec.encode(context_mod.error_info(exc))
            if not isinstance(exc, (errors.StepFailed, errors.WaitTimeout)):
                log.warning("run %s (%s) failed: %r", run_id, wdef.name, exc)
        finally:
            if timer is not None:
                timer.cancel()
        rows, versions = ctx.pending()
        final = status

        async def op(tx: Tx) -> None:
            await tx.finish(run_id, self.id, rows, versions, final, output, error, failed_seq)

        try:
            await app.writer.submit(op)
        except Fenced:
            return "lost"
        except Exception:
            log.exception("could not record the end of run %s; its lease will expire", run_id)
            return "lost"
        app._finished(run_id)
        return _ENDED[final]

    async def _release(self, run_id: str) -> None:
        try:
            owner = self.id

            async def op(tx: Tx) -> None:
                await tx.release(run_id, owner)

            await self.app.writer.submit(op)
        except Exception:
            log.exception("could not release run %s; its lease will expire", run_id)
