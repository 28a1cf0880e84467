"""The store seam: what the engine needs from a database, and the records it returns.

A store does two kinds of work:

* reads (`get_run`, `list_runs`, `steps`, ...), each a single statement outside any
  write transaction;
* writes, always through `Store.transact`: a list of operations applied in ONE database
  transaction, each operation inside its own savepoint so that one refused operation
  (a lost lease, an unknown run) never undoes the others. The engine batches whatever
  writes are ready at the same moment into one call, so one commit (one fsync) serves
  many steps of many runs: group commit.

Every write that comes from a worker is *fenced*: it names the lease owner, and the store
refuses it (`Fenced`) unless that owner still holds the run.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from flowdesk.store import people

T = TypeVar("T")


class RunStatus(enum.StrEnum):
    """A run's status; the values are the database column's."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

StepKind = Literal["step", "sleep", "signal", "child", "now", "any", "task"]
StepStatus = Literal["ok", "error", "pending"]


def now_ms() -> int:
    """Now, in epoch milliseconds: the unit of every stored timestamp."""
    return int(time.time() * 1000)


def ms_to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """A run as stored. Payloads (`input`, `output`, `error`) are decoded JSON."""

    id: str
    workflow: str
    queue: str
    priority: int
    status: RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    parent_id: str | None
    parent_seq: int | None
    forked_from: str | None
    forked_seq: int | None
    attempts: int
    cancel_requested: bool
    failed_seq: int | None
    waiting_for: list[str]
    due_at: datetime | None
    lease_owner: str | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None
    concurrency_key: str | None = None
    deadline_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One recorded step of a run: its result, its final error, or a pending wait."""

    run_id: str
    seq: int
    name: str
    kind: StepKind
    status: StepStatus
    output: Any
    error: dict[str, Any] | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None

    @property
    def duration_ms(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000


@dataclass(frozen=True, slots=True)
class StepRow:
    """A step row to write; payloads already encoded as JSON text."""

    seq: int
    name: str
    kind: StepKind
    status: StepStatus
    output: str | None
    error: str | None
    attempts: int
    started_at: int
    finished_at: int | None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """What replay needs of a recorded step (payloads still encoded)."""

    name: str
    kind: StepKind
    status: StepStatus
    output: str | None
    error: str | None
    started_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRun:
    id: str
    workflow: str
    input: str
    queue: str = "default"
    priority: int = 0
    idempotency_key: str | None = None
    input_hash: str | None = None
    parent_id: str | None = None
    parent_seq: int | None = None
    due_at: int = 0
    created_at: int = 0
    concurrency_key: str | None = None
    dedupe_key: str | None = None
    debounce_ms: int | None = None  # with dedupe_key: each repeat start pushes due_at out
    deadline_at: int | None = None
    initiator: str | None = None  # who asked for the work (children inherit the parent's)
    subjects: tuple[str, ...] = ()  # data subjects its payloads are about (children inherit)


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Limits that hold across every worker sharing the store."""

    name: str
    concurrency: int | None = None
    rate: int | None = None  # at most this many first starts ...
    rate_window_ms: int = 60_000  # ... in any window this long
    per_key_concurrency: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.concurrency or self.rate or self.per_key_concurrency)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    name: str
    workflow: str
    cron: str
    catchup: str
    paused: bool
    last_tick: datetime | None
    next_tick: datetime


@dataclass(slots=True)
class Claimed:
    """A run a worker has just claimed, with everything replay needs."""

    id: str
    workflow: str
    input: str
    attempts: int
    cancel_requested: bool
    deadline_at: int | None = None
    history: dict[int, HistoryRow] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    recovered: bool = False  # it was running and its lease had expired: a worker died
    trace_context: str | None = None  # W3C traceparent of the run's root span, if any


@dataclass(frozen=True, slots=True)
class RunGauge:
    """How many active runs of one (queue, workflow, status) there are, and how many of
    them are claimable now (due), the oldest due time among those (epoch ms)."""

    queue: str
    workflow: str
    status: RunStatus
    count: int
    due: int
    oldest_due_at: int | None


@dataclass(frozen=True, slots=True)
class TaskGauge:
    """How many open or claimed tasks of one (kind, status) there are, and how many of
    them are past their due time."""

    kind: str
    status: str
    count: int
    overdue: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[RunRecord]
    next_cursor: str | None


class Fenced(Exception):
    """The write was refused: the run is not (or no longer) held by this lease owner."""

    def __init__(self, run_id: str, reason: Literal["lease", "cancel"] = "lease") -> None:
        super().__init__(run_id, reason)
        self.run_id = run_id
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Resolved:
    """An awaited thing had already happened; `payload` is its recorded value."""

    payload: Any
    name: str | None = None  # which signal it was


@dataclass(frozen=True, slots=True)
class Expired:
    """A wait's deadline had passed before anything arrived."""


@dataclass(frozen=True, slots=True)
class Parked:
    """The run is now durably waiting; the worker drops it."""


AwaitOutcome = Resolved | Expired | Parked


class Tx(ABC):
    """Operations that run inside `Store.transact`; ``now`` is epoch milliseconds."""

    now: int

    @abstractmethod
    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        """Insert a run, or return the existing one with the same idempotency key.

        Returns ``(run_id, created)``. Raises `IdempotencyConflict` when the key was used
        for another workflow or another input."""

    @abstractmethod
    async def record(
        self, run_id: str, owner: str, rows: Sequence[StepRow], versions: dict[str, int]
    ) -> None:
        """Write step rows (insert or overwrite by seq) and version markers. Fenced."""

    @abstractmethod
    async def await_(
        self,
        run_id: str,
        owner: str,
        rows: Sequence[StepRow],
        versions: dict[str, int],
        wait: StepRow,
        signals: Sequence[str],
        deadline: int | None,
        children: Sequence[NewRun] = (),
        losers: dict[str, str] | None = None,
        tasks: Sequence[people.NewTask] = (),
    ) -> AwaitOutcome:
        """Resolve a wait at once or park the run. Fenced.

        Writes ``rows``, ``versions``, ``children`` and human ``tasks`` first. Then, when one of
        ``signals`` is pending, consumes the oldest such signal and records ``wait`` as done
        with ``{"name": ..., "payload": ...}`` when there are several names, or with the
        bare payload for one (`Resolved`); else when ``deadline`` has passed returns
        `Expired` (the caller records the outcome); else records ``wait`` as pending and
        parks the run as `waiting` until a signal or the deadline (`Parked`).
        ``losers`` maps signal names to child runs: on `Resolved`, every child but the
        winner's is cancelled in the same transaction."""

    @abstractmethod
    async def finish(
        self,
        run_id: str,
        owner: str,
        rows: Sequence[StepRow],
        versions: dict[str, int],
        status: RunStatus,
        output: str | None,
        error: str | None,
        failed_seq: int | None,
    ) -> None:
        """Close a run (fenced) and tell its parent, if any, that it finished."""

    @abstractmethod
    async def release(self, run_id: str, owner: str) -> None:
        """Give a run back to the queue (worker shutdown). Fenced, silently."""

    @abstractmethod
    async def signal(self, run_id: str, name: str, payload: str | None) -> None:
        """Store a signal for a run and wake the run if it waits for that name."""

    @abstractmethod
    async def cancel(self, run_id: str, reason: str, kind: str = "Cancelled") -> RunStatus:
        """Cancel a run and its unfinished children; returns the status it ends in
        (`running` runs are flagged and stop at their next step)."""

    @abstractmethod
    async def retry(self, run_id: str) -> None:
        """Queue a failed run again, dropping the recorded error of the step it failed at."""

    @abstractmethod
    async def fork(self, run_id: str, from_seq: int, new_id: str) -> int:
        """Create run ``new_id`` with the workflow and input of ``run_id`` and a copy of its
        recorded steps before ``from_seq`` (moved back to the first pending wait, if one
        comes earlier). Returns the seq it really forks from."""

    @abstractmethod
    async def sync_schedule(
        self, name: str, workflow: str, cron: str, catchup: str, next_tick: int
    ) -> ScheduleRecord:
        """Create the schedule, or update its cron and catch-up policy (a changed cron
        restarts from ``next_tick``). Returns it as stored."""

    @abstractmethod
    async def get_schedule(self, name: str) -> ScheduleRecord | None: ...

    @abstractmethod
    async def advance_schedule(self, name: str, last_tick: int | None, next_tick: int) -> None: ...

    @abstractmethod
    async def pause_schedule(self, name: str, paused: bool) -> None: ...

    @abstractmethod
    async def overdue(self, limit: int) -> list[str]:
        """Queued or waiting runs whose deadline has passed."""

    # -- people (implemented in sql_people.py) ------------------------------------------
    actor: str
    """Who the current operation acts for; it signs the operation's audit records."""

    @abstractmethod
    def audit(self, action: str, subject: str, data: Any, actor: str | None = None) -> None:
        """Append an audit record, in this transaction."""

    @abstractmethod
    async def create_task(self, task: people.NewTask) -> bool: ...

    @abstractmethod
    async def claim_task(self, task_id: str, who: people.Person) -> None: ...

    @abstractmethod
    async def unclaim_task(self, task_id: str, who: people.Person) -> None: ...

    @abstractmethod
    async def complete_task(
        self, task_id: str, who: people.Person, data: str, *, auto: str | None = None
    ) -> str: ...

    @abstractmethod
    async def delegate_task(self, task_id: str, who: people.Person, to_user: str) -> None: ...

    @abstractmethod
    async def comment_task(self, task_id: str, who: people.Person, text: str) -> None: ...

    @abstractmethod
    async def save_draft(self, task_id: str, who: people.Person, draft: str) -> None: ...

    @abstractmethod
    async def escalate_task(self, task_id: str, level: int) -> people.Escalated | None: ...

    @abstractmethod
    async def create_user(
        self,
        user_id: str,
        name: str,
        roles: Sequence[str],
        groups: Sequence[str],
        manager: str | None = None,
        password_hash: str | None = None,
    ) -> None: ...

    @abstractmethod
    async def update_user(
        self,
        user_id: str,
        *,
        roles: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        manager: str | None = None,
        disabled: bool | None = None,
    ) -> None: ...

    @abstractmethod
    async def create_token(
        self, token_id: str, user_id: str, secret_hash: str, name: str, expires_at: int | None
    ) -> None: ...

    @abstractmethod
    async def revoke_token(self, token_id: str) -> None: ...

    @abstractmethod
    async def add_checkpoint(
        self, seq: int, hash_: str, at: int, key_id: str, signature: str
    ) -> None: ...

    @abstractmethod
    async def purge_runs(self, finished_before: int, limit: int) -> list[str]: ...

    # -- privacy (implemented in sql_privacy.py) -------------------------------------------
    @abstractmethod
    async def add_subject(self, run_id: str, owner: str | None, subject: str) -> bool:
        """Tie a run's payloads to a data subject (fenced when ``owner`` is given)."""

    @abstractmethod
    async def erase_subject(self, subject: str, reason: str = "") -> dict[str, Any]:
        """Destroy a subject's data key and its runs' keys; cancel its unfinished runs."""

    @abstractmethod
    async def set_retention(self, workflow: str, keep_ms: int | None) -> None: ...

    @abstractmethod
    async def expire_payloads(self, limit: int) -> list[str]:
        """Destroy the data keys of finished runs past their workflow's retention."""

    @abstractmethod
    async def rewrap_keys(self, limit: int) -> int:
        """Wrap data keys of older master keys with the current one; returns how many."""

    # -- observability (implemented in sql_observe.py) ------------------------------------
    @abstractmethod
    async def set_trace_context(self, run_id: str, traceparent: str) -> bool:
        """Keep the traceparent of the run's root span, unless it has one already.
        Returns whether it was stored. Telemetry, not a transition: no audit record."""


Op = Callable[[Tx], Awaitable[Any]]
"""A write operation: runs inside `Store.transact`."""


class Store(ABC):
    """A durable store of runs. Subclasses: `SQLiteStore` (embedded default)."""

    url: str

    @abstractmethod
    async def open(self) -> None:
        """Connect, and create or upgrade the schema."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def transact(self, work: Sequence[Callable[[Tx], Awaitable[Any]]]) -> list[Any]:
        """Run each operation in one transaction, each in its own savepoint.

        Returns one entry per operation: its result, or the exception it raised (its
        savepoint rolled back, the others kept)."""

    @abstractmethod
    async def claim(
        self,
        owner: str,
        queues: Sequence[str],
        workflows: Sequence[str],
        limit: int,
        lease_ms: int,
        limits: dict[str, QueueLimits] | None = None,
    ) -> list[Claimed]:
        """Atomically take up to ``limit`` due runs: queued ones, waiting ones whose timer
        fired, and running ones whose lease expired (their worker died), by priority, then
        due time. Queue ``limits`` (concurrency, start rate, per-key concurrency) hold
        across every worker, because the count and the claim are one transaction."""

    @abstractmethod
    async def has_due(self, queues: Sequence[str], workflows: Sequence[str]) -> bool:
        """Cheap read: is any run claimable now?"""

    @abstractmethod
    async def heartbeat(
        self, owner: str, run_ids: Sequence[str], lease_ms: int, info: dict[str, Any]
    ) -> tuple[set[str], set[str]]:
        """Extend the leases of the runs ``owner`` executes (``run_ids``) and still holds.
        Returns (held, to_cancel): those ids, and the ones with a cancellation request. A
        run the owner holds in the store but no longer executes is not extended, so its
        lease runs out and another worker recovers it."""

    @abstractmethod
    async def forget_worker(self, owner: str) -> None: ...

    @abstractmethod
    async def schedules(self) -> list[ScheduleRecord]: ...

    @abstractmethod
    async def due_schedules(self) -> list[str]:
        """Names of unpaused schedules whose next tick has come."""

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def get_status(self, run_id: str) -> RunStatus | None: ...

    @abstractmethod
    async def run_by_key(self, idempotency_key: str) -> RunRecord | None:
        """The run started with this idempotency key, if any (a read: nothing is created)."""

    @abstractmethod
    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page: ...

    @abstractmethod
    async def steps(self, run_id: str) -> list[StepRecord]: ...

    @abstractmethod
    async def count_runs(self, status: str | None = None) -> int: ...

    # -- people (implemented in sql_people.py) ------------------------------------------
    @abstractmethod
    async def get_task(self, task_id: str) -> people.TaskRecord | None: ...

    @abstractmethod
    async def list_tasks(self, q: people.TaskQuery) -> people.TaskPage: ...

    @abstractmethod
    async def task_events(self, task_id: str) -> list[people.TaskEvent]: ...

    @abstractmethod
    async def due_escalations(self, limit: int = 100) -> list[tuple[str, int]]: ...

    @abstractmethod
    async def get_user(self, user_id: str) -> people.UserRecord | None: ...

    @abstractmethod
    async def list_users(self) -> list[people.UserRecord]: ...

    @abstractmethod
    async def password_hash(self, user_id: str) -> str | None: ...

    @abstractmethod
    async def token_owner(
        self, secret_hash: str
    ) -> tuple[people.TokenRecord, people.UserRecord] | None: ...

    @abstractmethod
    async def list_tokens(self, user_id: str | None = None) -> list[people.TokenRecord]: ...

    @abstractmethod
    async def audit_head(self) -> tuple[int, str]: ...

    @abstractmethod
    async def audit_rows(
        self, after_seq: int, limit: int, subject: str | None = None
    ) -> list[Sequence[Any]]: ...

    @abstractmethod
    async def audit_checkpoints(self) -> list[Sequence[Any]]: ...

    # -- privacy (implemented in sql_privacy.py) -------------------------------------------
    @abstractmethod
    async def run_subjects(self, run_id: str) -> list[str]: ...

    @abstractmethod
    async def subject_runs(self, subject: str) -> list[str]:
        """Ids of the runs tied to a data subject, oldest first."""

    @abstractmethod
    async def key_usage(self) -> dict[str, int]: ...

    @abstractmethod
    async def retention_policies(self) -> dict[str, int]: ...

    @abstractmethod
    async def signals_of(self, run_id: str) -> list[dict[str, Any]]: ...

    # -- observability (implemented in sql_observe.py) ------------------------------------
    @abstractmethod
    async def run_gauges(self) -> list[RunGauge]:
        """Active runs counted by queue, workflow and status (one cheap grouped count)."""

    @abstractmethod
    async def task_gauges(self) -> list[TaskGauge]:
        """Open and claimed human tasks counted by kind and status, with those overdue."""


def open_store(url: str) -> Store:
    """Build the store for a database URL (it is opened by `Store.open`)."""
    from flowdesk import errors

    if url.startswith("sqlite:") or url.endswith((".db", ".sqlite", ".sqlite3")):
        from flowdesk.store import sqlite

        return sqlite.SQLiteStore(url)
    if url.startswith(("postgres://", "postgresql://", "postgresql+psycopg://")):
        from flowdesk.store import postgres

        return postgres.PostgresStore(url)
    raise errors.ConfigurationError(
        f"Unsupported database URL {url!r}: use sqlite:///path/to/file.db or "
        "postgresql://user@host/dbname."
    )
