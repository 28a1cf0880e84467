"""What every SQL store shares: each query and each transition, written once.

A dialect (`sqlite.SQLiteStore`, `postgres.PostgresStore`) provides only how statements
run (`SqlTx._one`, `_all`, `_run`, `_many`, `SqlStore._read`, `SqlStore._txn`) and a few
fragments. SQL here uses ``?`` placeholders, ``IN (SELECT value FROM json_each(?))`` for a
list parameter, and ``{share}``/``{update}``/``{skip}`` where PostgreSQL locks rows
(SQLite serializes writers, so it needs no row locks); `Dialect.prepare` turns that into
the dialect's text once per statement.
"""

from __future__ import annotations

import base64
import hashlib
import json
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

from flowdesk import errors
from flowdesk.store import audit, base, people
from flowdesk.store.base import (
    AwaitOutcome,
    Claimed,
    Expired,
    Fenced,
    HistoryRow,
    NewRun,
    Page,
    Parked,
    QueueLimits,
    Resolved,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    StepRecord,
    StepRow,
)

T = TypeVar("T")

SEP = "\x1f"
CHILD_SIGNAL = "flowdesk.child:"
IN_LIST = " IN (SELECT value FROM json_each(?))"
_LOST_RACE = json.dumps({"type": "Cancelled", "message": "another branch of wait_any won"})

RUN_COLUMNS = (
    "id, workflow, queue, priority, status, input, output, error, idempotency_key, parent_id,"
    " parent_seq, forked_from, forked_seq, attempts, cancel_requested, failed_seq, waiting_for,"
    " due_at, lease_owner, created_at, started_at, updated_at, finished_at, concurrency_key,"
    " deadline_at"
)
SCHEDULE_COLUMNS = "name, workflow, cron, catchup, paused, last_tick, next_tick"
_STEP_COLUMNS = "run_id, seq, name, kind, status, output, error, attempts, started_at, finished_at"
_STEP_UPSERT = (
    " ON CONFLICT (run_id, seq) DO UPDATE SET name = excluded.name, kind = excluded.kind,"
    " status = excluded.status, output = excluded.output, error = excluded.error,"
    " attempts = excluded.attempts, started_at = excluded.started_at,"
    " finished_at = excluded.finished_at"
)
INSERT_STEP = f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)" + _STEP_UPSERT
INSERT_STEP_FENCED = (
    f"INSERT INTO steps ({_STEP_COLUMNS}) SELECT ?,?,?,?,?,?,?,?,?,? WHERE EXISTS"
    " (SELECT 1 FROM runs WHERE id = ? AND lease_owner = ? AND status = 'running'"
    " AND cancel_requested = 0{share})" + _STEP_UPSERT
)
# ``claimed_from = status`` keeps the status before the claim (SET expressions read the old
# row on both dialects): 'running' there means the run's lease had expired (recovery).
_CLAIM_SET = (
    "UPDATE runs SET status = 'running', lease_owner = ?, due_at = ?,"
    " attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
    " updated_at = ?, waiting_for = NULL, claimed_from = status"
)
_CLAIM_RETURNING = (
    " RETURNING id, workflow, input, attempts, cancel_requested, deadline_at, claimed_from,"
    " trace_context"
)
_ACTIVE = "('queued', 'running', 'waiting')"


class Dialect:
    """Turns the portable SQL above into a dialect's text."""

    name: ClassVar[str] = "sql"
    share: ClassVar[str] = ""
    update: ClassVar[str] = ""
    skip: ClassVar[str] = ""
    _cache: ClassVar[dict[str, str]]

    @classmethod
    def prepare(cls, sql: str) -> str:
        cache = cls.__dict__.get("_cache")
        if cache is None:
            cache = {}
            cls._cache = cache
        text = cache.get(sql)
        if text is None:
            text = cls.translate(
                sql.replace("{share}", cls.share)
                .replace("{update}", cls.update)
                .replace("{skip}", cls.skip)
            )
            cache[sql] = text
        return text

    @classmethod
    def translate(cls, sql: str) -> str:
        return sql

    @staticmethod
    def list_param(values: Sequence[str]) -> Any:
        return json.dumps(list(values))


def run_from_row(r: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=r[0],
        workflow=r[1],
        queue=r[2],
        priority=r[3],
        status=RunStatus(r[4]),
        input=json.loads(r[5]),
        output=None if r[6] is None else json.loads(r[6]),
        error=None if r[7] is None else json.loads(r[7]),
        idempotency_key=r[8],
        parent_id=r[9],
        parent_seq=r[10],
        forked_from=r[11],
        forked_seq=r[12],
        attempts=r[13],
        cancel_requested=bool(r[14]),
        failed_seq=r[15],
        waiting_for=r[16].split(SEP) if r[16] else [],
        due_at=base.ms_to_dt(r[17]),
        lease_owner=r[18],
        created_at=base.ms_to_dt(r[19]),  # type: ignore[arg-type]
        started_at=base.ms_to_dt(r[20]),
        updated_at=base.ms_to_dt(r[21]),  # type: ignore[arg-type]
        finished_at=base.ms_to_dt(r[22]),
        concurrency_key=r[23],
        deadline_at=base.ms_to_dt(r[24]),
    )


def schedule_from_row(r: Sequence[Any]) -> ScheduleRecord:
    return ScheduleRecord(
        name=r[0],
        workflow=r[1],
        cron=r[2],
        catchup=r[3],
        paused=bool(r[4]),
        last_tick=base.ms_to_dt(r[5]),
        next_tick=base.ms_to_dt(r[6]),  # type: ignore[arg-type]
    )


def _step_params(run_id: str, r: StepRow) -> tuple[Any, ...]:
    return (
        run_id,
        r.seq,
        r.name,
        r.kind,
        r.status,
        r.output,
        r.error,
        r.attempts,
        r.started_at,
        r.finished_at,
    )


class SqlTx(base.Tx):
    """Every transition, once. Subclasses run the statements."""

    dialect: ClassVar[type[Dialect]] = Dialect
    now: int

    def __init__(self, now: int) -> None:
        self.now = now
        self.actor = "system"
        self.events: list[audit.AuditEvent] = []

    def audit(self, action: str, subject: str, data: Any, actor: str | None = None) -> None:
        """Append an audit record when this transaction commits (`seal_audit`)."""
        self.events.append(audit.AuditEvent(actor or self.actor, action, subject, data))

    def _audit_rows(self, run_id: str, rows: Sequence[StepRow]) -> None:
        for r in rows:
            self.events.append(
                audit.AuditEvent(
                    self.actor,
                    "step.recorded" if r.status != "pending" else "step.waiting",
                    "run:" + run_id,
                    {
                        "seq": r.seq,
                        "name": r.name,
                        "kind": r.kind,
                        "status": r.status,
                        "output_sha256": audit.digest(r.output),
                        "error_sha256": audit.digest(r.error),
                    },
                )
            )

    async def seal_audit(self) -> None:
        """Chain the audit records of this transaction after the head, under the head's
        row lock (PostgreSQL) or the write lock (SQLite): appends are serialized, so the
        chain has no gaps and no forks. Called last, just before commit."""
        if not self.events:
            return
        head = await self._one("SELECT seq, hash FROM audit_head WHERE id = 1{update}")
        if head is None:
            raise errors.StoreError("The audit chain has no head row: the schema is damaged.")
        rows = audit.chain(self.events, int(head[0]), str(head[1]), self.now)
        self.events = []
        await self._append_audit(rows)

    async def _append_audit(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert chained audit rows and move the head to the last one."""
        await self._many(
            "INSERT INTO audit (seq, at, actor, action, subject, data, data_hash, prev_hash,"
            " hash) VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
        await self._run(
            "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rows[-1][0], rows[-1][8])
        )

    # -- how statements run (dialect) -------------------------------------------------
    @abstractmethod
    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None: ...

    @abstractmethod
    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]: ...

    @abstractmethod
    async def _run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; returns the number of rows changed."""

    @abstractmethod
    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def _lock_queue(self, name: str) -> None:
        """Serialize claims of one limited queue (SQLite: every write already is)."""

    async def notify(self, queue: str) -> None:
        """Wake idle workers of ``queue`` on other machines once this commits."""

    def _list(self, values: Sequence[str]) -> Any:
        return self.dialect.list_param(values)

    # -- helpers ---------------------------------------------------------------------
    async def _fence(self, run_id: str, owner: str, *, allow_cancel: bool = False) -> str | None:
        """Check (and on PostgreSQL lock) that ``owner`` holds the run; returns its parent."""
        row = await self._one(
            "SELECT lease_owner, status, cancel_requested, parent_id FROM runs"
            " WHERE id = ?{update}",
            (run_id,),
        )
        if row is None or row[0] != owner or row[1] != "running":
            raise Fenced(run_id)
        if row[2] and not allow_cancel:
            raise Fenced(run_id, "cancel")
        return None if row[3] is None else str(row[3])

    async def _write_rows(
        self, run_id: str, rows: Sequence[StepRow], versions: dict[str, int]
    ) -> None:
        if len(rows) == 1:
            await self._run(INSERT_STEP, _step_params(run_id, rows[0]))
        elif rows:
            await self._many(INSERT_STEP, [_step_params(run_id, r) for r in rows])
        self._audit_rows(run_id, rows)
        if versions:
            await self._many(
                "INSERT INTO versions (run_id, change_id, version) VALUES (?,?,?)"
                " ON CONFLICT DO NOTHING",
                [(run_id, k, v) for k, v in versions.items()],
            )

    async def _deliver(self, run_id: str, name: str, payload: str | None) -> None:
        row = await self._one(
            "SELECT status, waiting_for, queue FROM runs WHERE id = ?{update}", (run_id,)
        )
        await self._run(
            "INSERT INTO signals (run_id, name, payload, sent_at) VALUES (?,?,?,?)",
            (run_id, name, payload, self.now),
        )
        if row and row[0] == "waiting" and row[1] and name in row[1].split(SEP):
            await self._run(
                "UPDATE runs SET status = 'queued', due_at = ?, waiting_for = NULL,"
                " updated_at = ? WHERE id = ?",
                (self.now, self.now, run_id),
            )
            await self.notify(row[2])

    async def _notify_parent(
        self,
        run_id: str,
        status: str,
        output: str | None,
        error: str | None,
        parent_id: str | None | bool = True,
    ) -> None:
        """Tell the parent (``parent_id``; True: look it up) that a child finished."""
        if parent_id is True:
            row = await self._one("SELECT parent_id FROM runs WHERE id = ?", (run_id,))
            parent_id = None if row is None else row[0]
        if parent_id:
            parent = await self._one("SELECT status FROM runs WHERE id = ?", (parent_id,))
            if parent and not RunStatus(parent[0]).finished:
                payload = (
                    '{"run_id":'
                    + json.dumps(run_id)
                    + ',"status":'
                    + json.dumps(status)
                    + ',"output":'
                    + (output or "null")
                    + ',"error":'
                    + (error or "null")
                    + "}"
                )
                await self._deliver(parent_id, CHILD_SIGNAL + run_id, payload)

    async def _cancel_tree(self, run_id: str, error: str) -> RunStatus:
        row = await self._one("SELECT status FROM runs WHERE id = ?{update}", (run_id,))
        if row is None:
            raise errors.RunNotFound(run_id)
        status = RunStatus(row[0])
        if status.finished:
            return status
        if status is RunStatus.RUNNING:
            await self._run(
                "UPDATE runs SET cancel_requested = 1, error = ?, updated_at = ? WHERE id = ?",
                (error, self.now, run_id),
            )
            result = RunStatus.RUNNING
        else:
            await self._run(
                "UPDATE runs SET status = 'cancelled', error = ?, due_at = NULL,"
                " lease_owner = NULL, waiting_for = NULL, finished_at = ?, updated_at = ?"
                " WHERE id = ?",
                (error, self.now, self.now, run_id),
            )
            await self._close_tasks(run_id)
            await self._notify_parent(run_id, "cancelled", None, error)
            result = RunStatus.CANCELLED
        self.audit(
            "run.cancelled" if result is RunStatus.CANCELLED else "run.cancel_requested",
            "run:" + run_id,
            {"error_sha256": audit.digest(error)},
        )
        for (child_id,) in await self._all(
            f"SELECT id FROM runs WHERE parent_id = ? AND status IN {_ACTIVE}", (run_id,)
        ):
            await self._cancel_tree(child_id, error)
        return result

    async def _close_tasks(self, run_id: str) -> None:
        """A run that ends leaves none of its tasks open in anyone's inbox."""
        for (task_id,) in await self._all(
            "UPDATE tasks SET status = 'cancelled', escalate_at = NULL, updated_at = ?"
            " WHERE run_id = ? AND status IN ('open', 'claimed') RETURNING id",
            (self.now, run_id),
        ):
            self.audit("task.cancelled", "task:" + task_id, {"run_id": run_id})

    # -- operations ------------------------------------------------------------------
    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        if run.parent_id is not None:  # a child's id is derived from (parent, seq)
            if await self._one("SELECT 1 FROM runs WHERE id = ?", (run.id,)):
                return run.id, False
        if run.idempotency_key is not None:
            existing = await self._by_key(run)
            if existing is not None:
                return existing, False
        if run.dedupe_key is not None:
            row = await self._one(
                # Not yet started: a run queued again after a wait has begun its work.
                "SELECT id, workflow FROM runs WHERE dedupe_key = ? AND status = 'queued'"
                " AND started_at IS NULL{update}",
                (run.dedupe_key,),
            )
            if row is not None and row[1] == run.workflow:
                if run.debounce_ms is not None:  # the latest start wins and waits again
                    await self._run(
                        "UPDATE runs SET input = ?, due_at = ?, updated_at = ? WHERE id = ?",
                        (run.input, self.now + run.debounce_ms, self.now, row[0]),
                    )
                return row[0], False
        now = run.created_at or self.now
        initiator = run.initiator
        if initiator is None and run.parent_id is not None:
            row = await self._one("SELECT initiator FROM runs WHERE id = ?", (run.parent_id,))
            initiator = None if row is None else row[0]
        inserted = await self._one(
            "INSERT INTO runs (id, workflow, queue, priority, status, input, idempotency_key,"
            " input_hash, parent_id, parent_seq, due_at, created_at, updated_at,"
            " concurrency_key, dedupe_key, deadline_at, initiator)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING RETURNING id",
            (
                run.id,
                run.workflow,
                run.queue,
                run.priority,
                run.input,
                run.idempotency_key,
                run.input_hash,
                run.parent_id,
                run.parent_seq,
                run.due_at or now,
                now,
                now,
                run.concurrency_key,
                run.dedupe_key,
                run.deadline_at,
                initiator,
            ),
        )
        if inserted is None:  # another transaction took the key (or id) meanwhile
            existing = await self._by_key(run) if run.idempotency_key else run.id
            if existing is None:
                raise errors.StoreError(f"Could not create run {run.id}: it conflicts.")
            return existing, False
        self.audit(
            "run.started",
            "run:" + run.id,
            {
                "workflow": run.workflow,
                "queue": run.queue,
                "input_sha256": audit.digest(run.input),
                "idempotency_key": run.idempotency_key,
                "parent_id": run.parent_id,
                "initiator": initiator,
            },
        )
        await self.notify(run.queue)
        return run.id, True

    async def _by_key(self, run: NewRun) -> str | None:
        row = await self._one(
            "SELECT id, workflow, input_hash FROM runs WHERE idempotency_key = ?",
            (run.idempotency_key,),
        )
        if row is None:
            return None
        if row[1] != run.workflow or (run.input_hash is not None and row[2] != run.input_hash):
            raise errors.IdempotencyConflict(
                f"Idempotency key {run.idempotency_key!r} was already used by run "
                f"{row[0]} of workflow {row[1]!r} with "
                f"{'another workflow' if row[1] != run.workflow else 'different input'}"
                ". Use a new key for new work.",
                run_id=str(row[0]),
            )
        return str(row[0])

    async def record(
        self, run_id: str, owner: str, rows: Sequence[StepRow], versions: dict[str, int]
    ) -> None:
        if len(rows) == 1 and not versions:
            # The hot path (one step result): the fence is folded into the insert, and
            # checked apart only when the insert was refused.
            changed = await self._run(
                INSERT_STEP_FENCED, (*_step_params(run_id, rows[0]), run_id, owner)
            )
            if changed != 1:
                await self._fence(run_id, owner)
                raise Fenced(run_id)
            self._audit_rows(run_id, rows)
            return
        await self._fence(run_id, owner)
        await self._write_rows(run_id, rows, versions)

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
        await self._fence(run_id, owner)
        await self._write_rows(run_id, rows, versions)
        for child in children:
            await self.create_run(child)
        for task in tasks:
            await self.create_task(task)
        if signals:
            found = await self._one(
                "SELECT id, name, payload FROM signals WHERE run_id = ? AND consumed_seq IS NULL"
                " AND name" + IN_LIST + " ORDER BY id LIMIT 1",
                (run_id, self._list(signals)),
            )
            if found is not None:
                await self._run(
                    "UPDATE signals SET consumed_seq = ? WHERE id = ?", (wait.seq, found[0])
                )
                payload = found[2]
                if wait.kind == "any":
                    payload = (
                        '{"name":'
                        + json.dumps(found[1])
                        + ',"payload":'
                        + (found[2] or "null")
                        + "}"
                    )
                done = StepRow(
                    wait.seq,
                    wait.name,
                    wait.kind,
                    "ok",
                    payload,
                    None,
                    wait.attempts,
                    wait.started_at,
                    self.now,
                )
                await self._write_rows(run_id, [done], {})
                for name, child_id in (losers or {}).items():
                    if name != found[1]:
                        await self._cancel_tree(child_id, _LOST_RACE)
                return Resolved(None if found[2] is None else json.loads(found[2]), found[1])
        if deadline is not None and deadline <= self.now:
            return Expired()
        await self._write_rows(run_id, [wait], {})
        await self._run(
            "UPDATE runs SET status = 'waiting', lease_owner = NULL, due_at = CASE"
            " WHEN deadline_at IS NOT NULL AND (CAST(? AS BIGINT) IS NULL OR deadline_at < ?)"
            " THEN deadline_at ELSE ? END, waiting_for = ?, updated_at = ? WHERE id = ?",
            (deadline, deadline, deadline, SEP.join(signals) or None, self.now, run_id),
        )
        return Parked()

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
        parent_id = await self._fence(run_id, owner, allow_cancel=True)
        await self._write_rows(run_id, rows, versions)
        if status is RunStatus.CANCELLED and error is None:  # keep the reason cancel() stored
            row = await self._one("SELECT error FROM runs WHERE id = ?", (run_id,))
            error = (
                row[0]
                if row and row[0]
                else json.dumps({"type": "Cancelled", "message": "cancelled"})
            )
        await self._run(
            "UPDATE runs SET status = ?, output = ?, error = ?, failed_seq = ?, due_at = NULL,"
            " lease_owner = NULL, waiting_for = NULL, finished_at = ?, updated_at = ?"
            " WHERE id = ?",
            (status.value, output, error, failed_seq, self.now, self.now, run_id),
        )
        self.audit(
            "run.finished",
            "run:" + run_id,
            {
                "status": status.value,
                "output_sha256": audit.digest(output),
                "error_sha256": audit.digest(error),
                "failed_seq": failed_seq,
            },
        )
        if status is not RunStatus.SUCCEEDED:
            await self._close_tasks(run_id)
        if status is RunStatus.CANCELLED:
            for (child_id,) in await self._all(
                f"SELECT id FROM runs WHERE parent_id = ? AND status IN {_ACTIVE}", (run_id,)
            ):
                await self._cancel_tree(child_id, error or "null")
        await self._notify_parent(run_id, status.value, output, error, parent_id)

    async def release(self, run_id: str, owner: str) -> None:
        row = await self._one(
            "UPDATE runs SET status = 'queued', lease_owner = NULL, due_at = ?, updated_at = ?"
            " WHERE id = ? AND lease_owner = ? AND status = 'running' RETURNING queue",
            (self.now, self.now, run_id, owner),
        )
        if row is not None:
            await self.notify(row[0])

    async def signal(self, run_id: str, name: str, payload: str | None) -> None:
        row = await self._one("SELECT status FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise errors.RunNotFound(run_id)
        if RunStatus(row[0]).finished:
            raise errors.InvalidState(
                f"Run {run_id} is {row[0]}: only queued, running or waiting runs accept "
                f"signals (signal {name!r} was not stored)."
            )
        await self._deliver(run_id, name, payload)
        self.audit(
            "signal.sent", "run:" + run_id, {"name": name, "payload_sha256": audit.digest(payload)}
        )

    async def cancel(self, run_id: str, reason: str, kind: str = "Cancelled") -> RunStatus:
        row = await self._one("SELECT status FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise errors.RunNotFound(run_id)
        if row[0] in ("succeeded", "failed"):
            raise errors.InvalidState(f"Run {run_id} already {row[0]}; it cannot be cancelled.")
        return await self._cancel_tree(run_id, json.dumps({"type": kind, "message": reason}))

    async def retry(self, run_id: str) -> None:
        row = await self._one(
            "SELECT status, failed_seq, queue FROM runs WHERE id = ?{update}", (run_id,)
        )
        if row is None:
            raise errors.RunNotFound(run_id)
        if row[0] != "failed":
            raise errors.InvalidState(f"Run {run_id} is {row[0]}: only failed runs can be retried.")
        if row[1] is not None:
            # A failed child at or after the failed step is retried with its parent: its
            # failure notice is dropped so the replayed parent waits for the new outcome.
            for (child_id,) in await self._all(
                "SELECT id FROM runs WHERE parent_id = ? AND parent_seq >= ? AND status = 'failed'",
                (run_id, row[1]),
            ):
                await self._run(
                    "DELETE FROM signals WHERE run_id = ? AND name = ?",
                    (run_id, CHILD_SIGNAL + child_id),
                )
                await self.retry(child_id)
            await self._run("DELETE FROM steps WHERE run_id = ? AND seq >= ?", (run_id, row[1]))
            await self._run(
                "UPDATE signals SET consumed_seq = NULL WHERE run_id = ? AND consumed_seq >= ?",
                (run_id, row[1]),
            )
        await self._run(
            "UPDATE runs SET status = 'queued', output = NULL, error = NULL, failed_seq = NULL,"
            " cancel_requested = 0, due_at = ?, finished_at = NULL, updated_at = ?"
            " WHERE id = ?",
            (self.now, self.now, run_id),
        )
        self.audit("run.retried", "run:" + run_id, {"from_seq": row[1]})
        await self.notify(row[2])

    async def fork(self, run_id: str, from_seq: int, new_id: str) -> int:
        row = await self._one(
            "SELECT workflow, queue, priority, input, concurrency_key FROM runs WHERE id = ?",
            (run_id,),
        )
        if row is None:
            raise errors.RunNotFound(run_id)
        if from_seq < 1:
            raise errors.FlowdeskError(f"Fork from seq {from_seq}: steps are numbered from 1.")
        pending = await self._one(
            "SELECT MIN(seq) FROM steps WHERE run_id = ? AND status = 'pending'", (run_id,)
        )
        if pending is not None and pending[0] is not None and pending[0] < from_seq:
            from_seq = pending[0]  # a wait not yet over cannot be copied: fork before it
        await self._run(
            "INSERT INTO runs (id, workflow, queue, priority, status, input, concurrency_key,"
            " forked_from, forked_seq, due_at, created_at, updated_at)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?)",
            (
                new_id,
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                run_id,
                from_seq,
                self.now,
                self.now,
                self.now,
            ),
        )
        await self._run(
            f"INSERT INTO steps ({_STEP_COLUMNS}) SELECT ?, seq, name, kind, status, output,"
            " error, attempts, started_at, finished_at FROM steps WHERE run_id = ? AND seq < ?",
            (new_id, run_id, from_seq),
        )
        await self._run(
            "INSERT INTO versions (run_id, change_id, version)"
            " SELECT ?, change_id, version FROM versions WHERE run_id = ?",
            (new_id, run_id),
        )
        self.audit("run.forked", "run:" + new_id, {"from_run": run_id, "from_seq": from_seq})
        await self.notify(row[1])
        return int(from_seq)

    async def sync_schedule(
        self, name: str, workflow: str, cron: str, catchup: str, next_tick: int
    ) -> ScheduleRecord:
        await self._run(
            "INSERT INTO schedules (name, workflow, cron, catchup, next_tick, updated_at)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (name) DO UPDATE SET"
            " workflow = excluded.workflow, catchup = excluded.catchup,"
            " next_tick = CASE WHEN schedules.cron = excluded.cron THEN schedules.next_tick"
            "  ELSE excluded.next_tick END, cron = excluded.cron,"
            " updated_at = excluded.updated_at",
            (name, workflow, cron, catchup, next_tick, self.now),
        )
        record = await self.get_schedule(name)
        assert record is not None
        return record

    async def get_schedule(self, name: str) -> ScheduleRecord | None:
        row = await self._one(
            f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?{{update}}", (name,)
        )
        return None if row is None else schedule_from_row(row)

    async def advance_schedule(self, name: str, last_tick: int | None, next_tick: int) -> None:
        await self._run(
            "UPDATE schedules SET last_tick = COALESCE(?, last_tick), next_tick = ?,"
            " updated_at = ? WHERE name = ?",
            (last_tick, next_tick, self.now, name),
        )

    async def pause_schedule(self, name: str, paused: bool) -> None:
        updated = await self._run(
            "UPDATE schedules SET paused = ?, updated_at = ? WHERE name = ?",
            (int(paused), self.now, name),
        )
        if not updated:
            raise errors.NotFound(
                f"No schedule {name!r}. List them with `flowdesk schedules list`."
            )
        self.audit("schedule.paused" if paused else "schedule.resumed", "schedule:" + name, {})

    async def overdue(self, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT id FROM runs WHERE deadline_at <= ? AND deadline_at IS NOT NULL"
            " AND status IN ('queued', 'waiting') LIMIT ?",
            (self.now, limit),
        )
        return [r[0] for r in rows]

    # -- worker transactions ---------------------------------------------------------
    async def claim(
        self,
        owner: str,
        queues: Sequence[str],
        workflows: Sequence[str],
        limit: int,
        lease_ms: int,
        limits: dict[str, QueueLimits],
    ) -> list[Claimed]:
        now, lease = self.now, self.now + lease_ms
        limited = [limits[q] for q in queues if q in limits and limits[q].limited]
        free = [q for q in queues if not (q in limits and limits[q].limited)]
        rows: list[Sequence[Any]] = []
        picked: list[str] = []
        for queue in limited:
            if len(picked) >= limit:
                break
            await self._lock_queue(queue.name)
            picked += await self._pick_limited(queue, workflows, limit - len(picked))
        if picked:
            rows += await self._all(
                _CLAIM_SET + " WHERE id" + IN_LIST + _CLAIM_RETURNING,
                (owner, lease, now, now, self._list(picked)),
            )
        if len(rows) < limit and free:
            rows += await self._all(
                _CLAIM_SET + " WHERE id IN (SELECT id FROM runs WHERE due_at <= ?"
                " AND queue"
                + IN_LIST
                + " AND workflow"
                + IN_LIST
                + " ORDER BY priority DESC, due_at LIMIT ?{skip})"
                + _CLAIM_RETURNING,
                (
                    owner,
                    lease,
                    now,
                    now,
                    now,
                    self._list(free),
                    self._list(workflows),
                    limit - len(rows),
                ),
            )
        claimed = {
            r[0]: Claimed(
                r[0],
                r[1],
                r[2],
                r[3],
                bool(r[4]),
                r[5],
                recovered=r[6] == "running",
                trace_context=r[7],
            )
            for r in rows
        }
        if claimed:
            ids = self._list(list(claimed))
            for r in await self._all(
                "SELECT run_id, seq, name, kind, status, output, error, started_at FROM steps"
                " WHERE run_id" + IN_LIST,
                (ids,),
            ):
                claimed[r[0]].history[r[1]] = HistoryRow(r[2], r[3], r[4], r[5], r[6], r[7])
            for r in await self._all(
                "SELECT run_id, change_id, version FROM versions WHERE run_id" + IN_LIST, (ids,)
            ):
                claimed[r[0]].versions[r[1]] = r[2]
        return list(claimed.values())

    async def _pick_limited(self, q: QueueLimits, workflows: Sequence[str], room: int) -> list[str]:
        """Ids of due runs of queue ``q`` that fit its limits now, best first. A run whose
        lease expired is not counted as running: claiming it again is what recovers it."""
        now = self.now
        if q.concurrency is not None:
            row = await self._one(
                "SELECT COUNT(*) FROM runs WHERE queue = ? AND status = 'running' AND due_at > ?",
                (q.name, now),
            )
            room = min(room, q.concurrency - (row[0] if row else 0))
        if room <= 0:
            return []
        starts_left: int | None = None
        if q.rate is not None:
            row = await self._one(
                "SELECT COUNT(*) FROM runs WHERE queue = ? AND started_at > ?",
                (q.name, now - q.rate_window_ms),
            )
            starts_left = q.rate - (row[0] if row else 0)
        candidates = await self._all(
            "SELECT id, concurrency_key, started_at IS NULL FROM runs WHERE queue = ?"
            " AND due_at <= ? AND workflow" + IN_LIST + " ORDER BY priority DESC, due_at LIMIT ?",
            (q.name, now, self._list(workflows), room * 4 + 64),
        )
        per_key: dict[str, int] = {}
        picked: list[str] = []
        for run_id, key, fresh in candidates:
            if len(picked) >= room:
                break
            if fresh and starts_left is not None and starts_left <= 0:
                continue
            if key is not None and q.per_key_concurrency is not None:
                if key not in per_key:
                    row = await self._one(
                        "SELECT COUNT(*) FROM runs WHERE queue = ? AND concurrency_key = ?"
                        " AND status = 'running' AND due_at > ?",
                        (q.name, key, now),
                    )
                    per_key[key] = row[0] if row else 0
                if per_key[key] >= q.per_key_concurrency:
                    continue
                per_key[key] += 1
            if fresh and starts_left is not None:
                starts_left -= 1
            picked.append(run_id)
        return picked

    async def heartbeat(
        self, owner: str, run_ids: Sequence[str], lease_ms: int, info: dict[str, Any]
    ) -> tuple[set[str], set[str]]:
        rows: list[Sequence[Any]] = []
        if run_ids:
            rows = await self._all(
                "UPDATE runs SET due_at = ? WHERE lease_owner = ? AND status = 'running'"
                " AND id" + IN_LIST + " RETURNING id, cancel_requested",
                (self.now + lease_ms, owner, self._list(run_ids)),
            )
        await self._run(
            "INSERT INTO workers (id, host, pid, queues, concurrency, started_at,"
            " heartbeat_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET"
            " heartbeat_at = excluded.heartbeat_at",
            (
                owner,
                info.get("host", ""),
                info.get("pid", 0),
                ",".join(info.get("queues", [])),
                info.get("concurrency", 0),
                info.get("started_at", self.now),
                self.now,
            ),
        )
        return {r[0] for r in rows}, {r[0] for r in rows if r[1]}


class SqlStore(base.Store):
    """Reads and worker transactions, once for every SQL dialect."""

    dialect: ClassVar[type[Dialect]] = Dialect

    @abstractmethod
    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one read statement (portable SQL) outside any write transaction."""

    @abstractmethod
    def _txn(self) -> AbstractAsyncContextManager[SqlTx]:
        """A transaction of its own (committed on exit, rolled back on error)."""

    def _list(self, values: Sequence[str]) -> Any:
        return self.dialect.list_param(values)

    async def claim(
        self,
        owner: str,
        queues: Sequence[str],
        workflows: Sequence[str],
        limit: int,
        lease_ms: int,
        limits: dict[str, QueueLimits] | None = None,
    ) -> list[Claimed]:
        if limit <= 0:
            return []

        async def body() -> list[Claimed]:
            async with self._txn() as tx:
                return await tx.claim(owner, queues, workflows, limit, lease_ms, limits or {})

        return await self._again_on_conflict(body)

    async def heartbeat(
        self, owner: str, run_ids: Sequence[str], lease_ms: int, info: dict[str, Any]
    ) -> tuple[set[str], set[str]]:
        async def body() -> tuple[set[str], set[str]]:
            async with self._txn() as tx:
                return await tx.heartbeat(owner, run_ids, lease_ms, info)

        return await self._again_on_conflict(body)

    async def forget_worker(self, owner: str) -> None:
        async def body() -> None:
            async with self._txn() as tx:
                await tx._run("DELETE FROM workers WHERE id = ?", (owner,))

        await self._again_on_conflict(body)

    async def _again_on_conflict(self, body: Callable[[], Awaitable[T]]) -> T:
        """Run a transaction again when the database rolled it back for a conflict with
        another one (a deadlock); SQLite's serialized writers never see one."""
        return await body()

    async def has_due(self, queues: Sequence[str], workflows: Sequence[str]) -> bool:
        rows = await self._read(
            "SELECT 1 FROM runs WHERE due_at <= ? AND queue"
            + IN_LIST
            + " AND workflow"
            + IN_LIST
            + " LIMIT 1",
            (base.now_ms(), self._list(queues), self._list(workflows)),
        )
        return bool(rows)

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return run_from_row(rows[0]) if rows else None

    async def run_by_key(self, idempotency_key: str) -> RunRecord | None:
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE idempotency_key = ?", (idempotency_key,)
        )
        return run_from_row(rows[0]) if rows else None

    async def get_status(self, run_id: str) -> RunStatus | None:
        rows = await self._read("SELECT status FROM runs WHERE id = ?", (run_id,))
        return RunStatus(rows[0][0]) if rows else None

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if status is not None:
            RunStatus(status)  # raises ValueError for an unknown status
            where.append("status = ?")
            params.append(status)
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if cursor:
            created, run_id = decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created, created, run_id]
        limit = max(1, min(limit, 1000))
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit + 1),
        )
        items = [run_from_row(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(last[19], last[0])
        return Page(items, next_cursor)

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._read(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        return [
            StepRecord(
                run_id=r[0],
                seq=r[1],
                name=r[2],
                kind=r[3],
                status=r[4],
                output=None if r[5] is None else json.loads(r[5]),
                error=None if r[6] is None else json.loads(r[6]),
                attempts=r[7],
                started_at=base.ms_to_dt(r[8]),  # type: ignore[arg-type]
                finished_at=base.ms_to_dt(r[9]),
            )
            for r in rows
        ]

    async def count_runs(self, status: str | None = None) -> int:
        if status is None:
            rows = await self._read("SELECT COUNT(*) FROM runs")
        else:
            rows = await self._read("SELECT COUNT(*) FROM runs WHERE status = ?", (status,))
        return int(rows[0][0])

    async def schedules(self) -> list[ScheduleRecord]:
        rows = await self._read(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")
        return [schedule_from_row(r) for r in rows]

    async def due_schedules(self) -> list[str]:
        rows = await self._read(
            "SELECT name FROM schedules WHERE paused = 0 AND next_tick <= ?", (base.now_ms(),)
        )
        return [r[0] for r in rows]


def encode_cursor(created_at: int, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        created, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().split(":", 1)
        value = int(created)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidCursor(f"Invalid cursor {cursor!r}: pass one a page returned.") from exc
    if not 0 <= value < 2**63 or "\x00" in run_id:
        raise errors.InvalidCursor(f"Invalid cursor {cursor!r}: pass one a page returned.")
    return value, run_id


def input_hash(encoded_input: str) -> str:
    return hashlib.sha256(encoded_input.encode()).hexdigest()[:32]
