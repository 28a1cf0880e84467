"""`App`: the registry of workflows and steps, and the client of the store."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flowdesk import codec, errors
from flowdesk.engine import gateway_port, observe_port, registry, schedules, tasks
from flowdesk.engine.writer import Writer
from flowdesk.store import audit, base, sql_privacy
from flowdesk.store import sql as sql_store
from flowdesk.store.base import (
    NewRun,
    Page,
    QueueLimits,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    StepRecord,
)

if TYPE_CHECKING:
    from flowdesk.engine.worker import Worker

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEFAULT_URL = "sqlite:///flowdesk.db"


def _secs(value: timedelta | float | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def _person(actor: str) -> str | None:
    """The acting user, or None when the system acts."""
    return None if actor == "system" or actor.startswith("system:") else actor


def new_run_id() -> str:
    """A time-ordered id (48-bit millisecond time, then 80 random bits), as 32 hex digits."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True, slots=True)
class RunHandle:
    """What `App.start` returns: the run's id, and whether this call created it."""

    id: str
    workflow: str
    created: bool
    app: App

    async def result(self, timeout: float | None = None) -> Any:
        return await self.app.result(self.id, timeout=timeout)

    async def status(self) -> RunStatus:
        return (await self.app.get_run(self.id)).status


class App:
    """A flowdesk application: workflows, steps, and the store they run on.

    ``database_url`` defaults to ``$FLOWDESK_DATABASE_URL``, else ``sqlite:///flowdesk.db``.
    Nothing touches the disk until the first call that needs the store.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.25,
        heartbeat_interval: float | None = None,
        executor_threads: int = 32,
        notifier: tasks.Notifier | None = None,
    ) -> None:
        self.database_url = database_url or os.environ.get("FLOWDESK_DATABASE_URL") or DEFAULT_URL
        self.new_run_id = new_run_id
        if lease_seconds <= 0 or poll_interval <= 0:
            raise errors.ConfigurationError("lease_seconds and poll_interval must be > 0")
        self.lease_ms = int(lease_seconds * 1000)
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval or lease_seconds / 3
        if self.heartbeat_interval >= lease_seconds:
            raise errors.ConfigurationError("heartbeat_interval must be shorter than the lease")
        self.registry = registry.Registry()
        self._executor_threads = executor_threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._store: base.Store | None = None
        self._writer: Writer | None = None
        self._open_lock: asyncio.Lock | None = None
        self._workers: list[Worker] = []
        self._wake: asyncio.Event | None = None
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._fn_names: dict[Callable[..., Any], str] = {}
        self.queues: dict[str, QueueLimits] = {}
        self.schedule_defs: dict[str, schedules.Schedule] = {}
        self.notifier: tasks.Notifier = notifier or tasks.LogNotifier()
        # Called about once a second by every worker's upkeep loop (audit checkpoints...).
        self.upkeep_hooks: list[Callable[[], Awaitable[None]]] = []
        # What `Context.model` asks: e.g. `flowdesk.models.gateway.Gateway.from_toml(path)`.
        self.gateway: gateway_port.ModelGateway | None = None
        # Metrics, spans and log context (`flowdesk.observe.instrument(app)` sets it).
        self.observer: observe_port.Observer | None = None
        # Business metrics the app's workflows record with `Context.metric`.
        self.metrics = observe_port.MetricCatalog()

    # -- registration ----------------------------------------------------------------
    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        backoff: float = 2.0,
        retry_delay: float = 1.0,
        max_delay: float = 60.0,
        jitter: bool = True,
        timeout: float | timedelta | None = None,
        no_retry_on: tuple[type[BaseException], ...] = (),
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        backoff: float = 2.0,
        retry_delay: float = 1.0,
        max_delay: float = 60.0,
        jitter: bool = True,
        timeout: float | timedelta | None = None,
        no_retry_on: tuple[type[BaseException], ...] = (),
    ) -> F | Callable[[F], F]:
        """Mark a function (sync or async) as a step: retried on failure with exponential
        backoff and jitter, limited to ``timeout`` seconds per attempt, recorded once."""
        policy = registry.RetryPolicy(
            retries=retries,
            delay=retry_delay,
            backoff=backoff,
            max_delay=max_delay,
            jitter=jitter,
            no_retry_on=no_retry_on,
        )
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout

        def decorate(f: F) -> F:
            sdef = registry.StepDef(f, name=name or f.__qualname__, policy=policy, timeout=seconds)
            return sdef  # type: ignore[return-value]

        return decorate(fn) if fn is not None else decorate

    def workflow(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        timeout: float | timedelta | None = None,
        schedule: str | None = None,
        catchup: str = "skip",
        key: str | None = None,
    ) -> Callable[[F], F]:
        """Register an ``async def workflow(ctx, **input)`` under ``name``.

        ``queue`` names the queue its runs wait in (see `queue`). ``timeout`` cancels a run
        (and its children) that has not finished that long after it started. ``schedule``
        is a cron expression: one run starts per tick, however many workers run, and
        ``catchup`` says what happens to ticks missed while nothing ran (``"skip"``: only
        the latest runs; ``"all"``: every one). ``key`` names an input field whose value
        is the run's concurrency key (for ``per_key_concurrency``)."""

        def decorate(fn: F) -> F:
            wname = name or fn.__qualname__
            wdef = registry.WorkflowDef(
                fn, name=wname, queue=queue, timeout=_secs(timeout), key=key
            )
            if key is not None and key not in wdef.params and not wdef.single_model:
                raise errors.ConfigurationError(
                    f"Workflow {wname!r}: key={key!r} is not one of its inputs {wdef.params}."
                )
            sched = None
            if schedule is not None:
                sched = schedules.validate(wname, schedule, catchup, wdef)
            self.registry.add_workflow(wdef)
            if sched is not None:
                self.schedule_defs[wname] = sched
            self._fn_names[fn] = wname
            return fn

        return decorate

    def queue(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        rate: tuple[int, timedelta | float] | None = None,
        per_key_concurrency: int | None = None,
    ) -> QueueLimits:
        """Declare a queue's limits; they hold across every worker sharing the store.

        ``concurrency``: at most this many of its runs execute at once. ``rate=(n, per)``:
        at most ``n`` runs start in any window of ``per``. ``per_key_concurrency``: at most
        this many runs with the same concurrency key execute at once (``start(...,
        concurrency_key=...)`` or the workflow's ``key=`` input field). Within a queue,
        higher ``priority`` starts first."""
        for label, value in (
            ("concurrency", concurrency),
            ("per_key_concurrency", per_key_concurrency),
        ):
            if value is not None and value < 1:
                raise errors.ConfigurationError(f"queue {name!r}: {label} must be >= 1")
        count, window = rate if rate is not None else (None, 60.0)
        window_s = _secs(window) or 0.0
        if rate is not None and (count is None or count < 1 or window_s <= 0):
            raise errors.ConfigurationError(
                f"queue {name!r}: rate must be (n >= 1, a positive window)"
            )
        limits = QueueLimits(name, concurrency, count, int(window_s * 1000), per_key_concurrency)
        self.queues[name] = limits
        return limits

    def workflow_name(self, workflow: str | Callable[..., Any]) -> str:
        if isinstance(workflow, str):
            return workflow
        try:
            return self._fn_names[workflow]
        except (KeyError, TypeError):
            raise errors.UnknownWorkflow(
                getattr(workflow, "__qualname__", repr(workflow)), list(self.registry.workflows)
            ) from None

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Open the store (creating or upgrading its schema). Called for you on first use."""
        if self._store is not None:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._store is None:
                store = base.open_store(self.database_url)
                await store.open()
                self._writer = Writer(store)
                self._store = store

    async def close(self) -> None:
        for worker in list(self._workers):
            worker.stop()
        if self._store is not None:
            await self._store.close()
            self._store = None
            self._writer = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> App:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def store(self) -> base.Store:
        if self._store is None:
            raise errors.StoreError("The app is not open: `await app.open()` or `async with app`.")
        return self._store

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            raise errors.StoreError("The app is not open: `await app.open()` or `async with app`.")
        return self._writer

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._executor_threads, thread_name_prefix="flowdesk-step"
            )
        return self._executor

    def worker(
        self,
        *,
        concurrency: int = 100,
        queues: Sequence[str] | None = None,
        grace_seconds: float = 10.0,
    ) -> _BackgroundWorker:
        """A worker for this app. ``await w.run()`` runs it in the foreground; ``async with
        app.worker():`` runs it in the background for the block."""
        from flowdesk.engine.worker import Worker

        return _BackgroundWorker(
            Worker(self, concurrency=concurrency, queues=queues, grace_seconds=grace_seconds)
        )

    # -- local notifications (workers in this process) --------------------------------
    def _wake_event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def wake(self) -> None:
        """Tell this process's workers that new work may be due."""
        if self._wake is not None:
            self._wake.set()

    def _attach(self, worker: Worker) -> None:
        self._workers.append(worker)

    def _detach(self, worker: Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)

    def _finished(self, run_id: str) -> None:
        for fut in self._waiters.pop(run_id, ()):
            if not fut.done():
                fut.set_result(None)

    # -- client operations -----------------------------------------------------------
    async def start(
        self,
        workflow: str | Callable[..., Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        delay: timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        concurrency_key: str | None = None,
        dedupe_key: str | None = None,
        debounce: timedelta | float | None = None,
        initiator: str | None = None,
        subjects: Sequence[str] = (),
    ) -> RunHandle:
        """Start a run.

        ``idempotency_key``: a key already used for the same workflow and input returns that
        run (``created`` is False); for other input it raises `IdempotencyConflict`.
        ``dedupe_key``: while a run with this key is still queued, return it instead of
        starting another; with ``debounce``, the run waits that long and every repeat start
        pushes it back and replaces its input (the last one wins). ``priority``: higher
        starts first within the queue. ``delay``: start no earlier than that. ``timeout``:
        overrides the workflow's. ``initiator``: who asks for the work (default: the acting
        user of an API request); four-eyes tasks refuse completion by them. ``subjects``:
        the data subjects (``"customer:42"``) its payloads are about; erasing one destroys
        the run's data key (see ``docs/privacy.md``)."""
        await self.open()
        new = self.new_run(
            workflow,
            input,
            idempotency_key=idempotency_key,
            queue=queue,
            priority=priority,
            delay=delay,
            timeout=timeout,
            concurrency_key=concurrency_key,
            dedupe_key=dedupe_key,
            debounce=debounce,
            initiator=initiator,
            subjects=subjects,
        )
        run_id, created = await self.submit(lambda tx: tx.create_run(new))
        if created:
            self.wake()
        return RunHandle(run_id, new.workflow, created, self)

    def new_run(
        self,
        workflow: str | Callable[..., Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        delay: timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        concurrency_key: str | None = None,
        dedupe_key: str | None = None,
        debounce: timedelta | float | None = None,
        initiator: str | None = None,
        subjects: Sequence[str] = (),
    ) -> NewRun:
        """The run `start` creates (input validated, not stored yet), for a caller that
        creates it with ``tx.create_run`` inside a transaction of its own (a webhook records
        its delivery in the same one). Same arguments as `start`."""
        name = self.workflow_name(workflow)
        wdef = self.registry.workflow(name)
        encoded = wdef.validate(input)
        now = int(time.time() * 1000)
        wait_s = (_secs(delay) or 0.0) + (_secs(debounce) or 0.0)
        limit = _secs(timeout) if timeout is not None else wdef.timeout
        if debounce is not None and dedupe_key is None:
            raise errors.ConfigurationError("debounce needs a dedupe_key")
        if isinstance(subjects, str):
            raise errors.ConfigurationError(
                f"subjects={subjects!r}: pass a list of subjects, such as [{subjects!r}]."
            )
        return NewRun(
            id=new_run_id(),
            workflow=name,
            input=encoded,
            queue=queue or wdef.queue,
            priority=priority,
            idempotency_key=idempotency_key,
            input_hash=sql_store.input_hash(encoded) if idempotency_key else None,
            due_at=now + int(wait_s * 1000),
            created_at=now,
            concurrency_key=concurrency_key or wdef.concurrency_key(encoded),
            dedupe_key=dedupe_key,
            debounce_ms=None if debounce is None else int((_secs(debounce) or 0) * 1000),
            deadline_at=None if limit is None else now + int(limit * 1000),
            initiator=initiator or _person(audit.ACTOR.get()),
            subjects=tuple(sql_privacy.check_subject(s) for s in subjects),
        )

    async def submit(self, op: Callable[[base.Tx], Awaitable[T]], actor: str | None = None) -> T:
        """Apply one write operation (group-committed with others), on behalf of ``actor``
        (default: the acting user, `audit.ACTOR`), whose name its audit records carry."""
        await self.open()
        who = actor or audit.ACTOR.get()

        async def acting(tx: base.Tx) -> T:
            tx.actor = who
            return await op(tx)

        result: T = await self.writer.submit(acting)
        return result

    async def fork(self, run_id: str, from_seq: int) -> RunHandle:
        """A new run of the same workflow and input that keeps the recorded results before
        ``from_seq`` (child workflows included: they are not run again) and executes from
        there. The new run records where it was forked from."""
        await self.open()
        new_id = new_run_id()
        await self.submit(lambda tx: tx.fork(run_id, from_seq, new_id))
        self.wake()
        run = await self.get_run(new_id)
        return RunHandle(new_id, run.workflow, True, self)

    async def schedules(self) -> list[ScheduleRecord]:
        """Every stored schedule (a worker stores its app's schedules when it starts)."""
        await self.open()
        return await self.store.schedules()

    async def pause_schedule(self, name: str) -> None:
        await self.open()
        await self.submit(lambda tx: tx.pause_schedule(name, True))

    async def resume_schedule(self, name: str) -> None:
        """Resume a paused schedule from its next tick after now (paused ticks are skipped)."""
        await self.open()

        async def op(tx: base.Tx) -> None:
            record = await tx.get_schedule(name)
            if record is None:
                raise errors.NotFound(
                    f"No schedule {name!r}. List them with `flowdesk schedules list`."
                )
            await tx.pause_schedule(name, False)
            await tx.advance_schedule(name, None, schedules.next_after(record.cron, tx.now))

        await self.submit(op)

    async def signal(self, run_id: str, name: str, payload: Any = None) -> None:
        """Send a signal; a run that waits for it wakes. Raises `RunNotFound` for an unknown
        run and `InvalidState` for a finished one."""
        if name.startswith("flowdesk."):
            raise errors.ConfigurationError(
                f"Signal names starting with 'flowdesk.' are the engine's own ({name!r}): "
                "complete tasks through the inbox, and choose another name."
            )
        await self.open()
        encoded = codec.encode(payload, f"payload of signal {name!r}")
        await self.submit(lambda tx: tx.signal(run_id, name, encoded))
        self.wake()

    async def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunStatus:
        """Cancel a run and its children. Queued and waiting runs end at once; a running one
        stops at its next step (its worker is told within a heartbeat)."""
        await self.open()
        observer = self.observer
        before = None if observer is None else await self.store.get_status(run_id)
        status: RunStatus = await self.submit(lambda tx: tx.cancel(run_id, reason))
        if status is RunStatus.RUNNING:
            for worker in self._workers:
                worker.interrupt(run_id, "cancel")
        else:
            self._finished(run_id)
            ended_now = before is not None and not before.finished
            if observer is not None and status is RunStatus.CANCELLED and ended_now:
                await observer.runs_ended([run_id], status)
        return status

    async def retry(self, run_id: str) -> RunHandle:
        """Resume a failed run: recorded steps are kept, the failed step runs again."""
        await self.open()
        await self.submit(lambda tx: tx.retry(run_id))
        self.wake()
        run = await self.get_run(run_id)
        return RunHandle(run_id, run.workflow, False, self)

    async def get_run(self, run_id: str) -> RunRecord:
        await self.open()
        run = await self.store.get_run(run_id)
        if run is None:
            raise errors.RunNotFound(run_id)
        return run

    async def list_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        await self.open()
        if status is not None and status not in RunStatus._value2member_map_:
            raise errors.FlowdeskError(
                f"Unknown status {status!r}: use one of {', '.join(s.value for s in RunStatus)}."
            )
        return await self.store.list_runs(
            status=None if status is None else str(status),
            workflow=workflow,
            limit=limit,
            cursor=cursor,
        )

    async def steps(self, run_id: str) -> list[StepRecord]:
        await self.open()
        if await self.store.get_status(run_id) is None:
            raise errors.RunNotFound(run_id)
        return await self.store.steps(run_id)

    async def wait(self, run_id: str, timeout: float | None = None) -> RunRecord:
        """Wait until the run is finished and return it (raises `ResultTimeout`)."""
        await self.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            status = await self.store.get_status(run_id)
            if status is None:
                raise errors.RunNotFound(run_id)
            if status.finished:
                return await self.get_run(run_id)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise errors.ResultTimeout(
                    f"Run {run_id} is still {status.value} after {timeout} s."
                )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(run_id, []).append(fut)
            wait_for = min(pause, left) if left is not None else pause
            try:
                await asyncio.wait_for(fut, wait_for)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(run_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[run_id]
            pause = min(pause * 2, self.poll_interval)

    async def result(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait for the run and return its output; raises `RunFailed` or `RunCancelled`."""
        run = await self.wait(run_id, timeout)
        if run.status is RunStatus.FAILED:
            raise errors.RunFailed(run_id, run.error or {})
        if run.status is RunStatus.CANCELLED:
            raise errors.RunCancelled(run_id, (run.error or {}).get("message", ""))
        wdef = self.registry.workflows.get(run.workflow)
        return run.output if wdef is None else wdef.decode_result(run.output)


class _BackgroundWorker:
    """A `Worker` that also works as ``async with``: started on entry, stopped on exit."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._task: asyncio.Task[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)

    async def run(self) -> None:
        await self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    async def __aenter__(self) -> Worker:
        await self.worker.app.open()
        self._task = asyncio.create_task(self.worker.run(), name="flowdesk-worker")
        await asyncio.sleep(0)
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop()
        if self._task is not None:
            await self._task
