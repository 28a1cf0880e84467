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
from flowdesk.store import audit, base, payloads, people, sql_payloads
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


def run_from_row(r: Sequence[Any], keys: sql_payloads.RunKeys | None = None) -> RunRecord:
    """A run from its row; ``keys`` opens sealed payloads (see `sql_payloads.load`)."""
    k = keys or sql_payloads.RunKeys(None)
    return RunRecord(
        id=r[0],
        workflow=r[1],
        queue=r[2],
        priority=r[3],
        status=RunStatus(r[4]),
        input=k.json(r[0], 0, "input", r[5]),
        output=k.json(r[0], 0, "output", r[6]),
        error=k.json(r[0], 0, "error", r[7]),
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
    keys: payloads.Keyring | None = None
    """Seals payloads before they are written (the store sets it; None: encryption off)."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.actor = "system"
        self.events: list[audit.AuditEvent] = []

    # -- payload sealing ---------------------------------------------------------------
    async def _key(self, run_id: str) -> payloads.DataKey | None:
        """The run's data key: from memory on the hot path, else from its row (created
        for a run from before encryption). A destroyed key refuses the write (`Fenced`:
        the run was erased, and cancelled with it)."""
        ring = self.keys
        if ring is None:
            return None
        key = ring.cached(run_id)
        if key is not None:
            return key
        found = await sql_payloads.load(ring, self._all, self._list, [run_id])
        got = found.by_run.get(run_id)
        if isinstance(got, str):
            raise Fenced(run_id, "cancel")
        if got is None:
            got = ring.new_key("run")
            if not await self._insert_key(got, "run", run_id):
                return await self._key(run_id)
        ring.remember(run_id, got)
        return got

    async def _insert_key(
        self,
        key: payloads.DataKey,
        kind: str,
        owner: str,
        subjects: Sequence[payloads.DataKey] = (),
    ) -> bool:
        """Store a new data key, wrapped; False when a live key of (kind, owner) exists."""
        assert self.keys is not None
        by, wrapped = self.keys.wrap(key, kind, owner, subjects)
        row = await self._one(
            "INSERT INTO data_keys (id, kind, owner, wrapped_by, wrapped, created_at)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (kind, owner) WHERE wrapped IS NOT NULL"
            " DO NOTHING RETURNING id",
            (key.id, kind, owner, by, wrapped, self.now),
        )
        return row is not None

    async def _seal(self, run_id: str, seq: int, kind: str, text: str | None) -> str | None:
        if text is None or self.keys is None:
            return text
        key = await self._key(run_id)
        return text if key is None else payloads.Keyring.seal(key, run_id, seq, kind, text)

    async def _open(self, run_id: str, seq: int, kind: str, stored: str | None) -> str | None:
        """A payload read inside a transaction, as plaintext JSON text."""
        if stored is None or not stored.startswith(payloads.PREFIX):
            return stored
        found = await sql_payloads.load(self.keys, self._all, self._list, [run_id])
        return found.text(run_id, seq, kind, stored)

    async def _seal_rows(self, run_id: str, rows: Sequence[StepRow]) -> Sequence[StepRow]:
        ring = self.keys
        if ring is None or not rows:
            return rows
        key = ring.cached(run_id) or await self._key(run_id)  # the cache: no coroutine
        if key is None:
            return rows
        seal = payloads.Keyring.seal
        out: list[StepRow] = []
        for r in rows:  # built directly: dataclasses.replace costs more than the sealing
            if r.output is None and r.error is None:
                out.append(r)
                continue
            out.append(
                StepRow(
                    r.seq,
                    r.name,
                    r.kind,
                    r.status,
                    None if r.output is None else seal(key, run_id, r.seq, "step.output", r.output),
                    None if r.error is None else seal(key, run_id, r.seq, "step.error", r.error),
                    r.attempts,
                    r.started_at,
                    r.finished_at,
                )
            )
        return out

    def audit(self, action: str, subject: str, data: Any, actor: str | None = None) -> None:
        """Append an audit record when this transaction commits (`seal_audit`)."""
        self.events.append(audit.AuditEvent(actor or self.actor, action, subject, data))

    def _audit_rows(self, run_id: str, rows: Sequence[StepRow]) -> None:
        """Audit step rows as stored (their payloads sealed: the digests are of ciphertext)."""
        for r in rows:
            self._audit_step(run_id, r.seq, r.name, r.kind, r.status, r.output, r.error)

    def _audit_step(
        self,
        run_id: str,
        seq: int,
        name: str,
        kind: str,
        status: str,
        output: str | None,
        error: str | None,
    ) -> None:
        self.events.append(
            audit.AuditEvent(
                self.actor,
                "step.recorded" if status != "pending" else "step.waiting",
                "run:" + run_id,
                {
                    "seq": seq,
                    "name": name,
                    "kind": kind,
                    "status": status,
                    "output_sha256": audit.digest(output),
                    "error_sha256": audit.digest(error),
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
        rows = await self._seal_rows(run_id, rows)
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

    async def _deliver(self, run_id: str, name: str, payload: str | None) -> str | None:
        """Store a signal (its payload sealed) and wake the run; returns what was stored."""
        row = await self._one(
            "SELECT status, waiting_for, queue FROM runs WHERE id = ?{update}", (run_id,)
        )
        try:
            payload = await self._seal(run_id, 0, "signal:" + name, payload)
        except Fenced:  # the run's payloads were erased: nothing of this one is kept either
            payload = payloads.erased_text("the run's payloads were erased")
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
        return payload

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

    async def _cancel_tree(self, run_id: str, error: str, *, seal: bool = True) -> RunStatus:
        """Cancel a run and its unfinished children with ``error`` (plaintext JSON; kept
        unsealed when ``seal`` is False: the reason of an erasure, readable afterwards)."""
        row = await self._one("SELECT status FROM runs WHERE id = ?{update}", (run_id,))
        if row is None:
            raise errors.RunNotFound(run_id)
        status = RunStatus(row[0])
        if status.finished:
            return status
        plain = error
        if seal:
            error = await self._seal(run_id, 0, "error", error) or error
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
            await self._notify_parent(run_id, "cancelled", None, plain)
            result = RunStatus.CANCELLED
        self.audit(
            "run.cancelled" if result is RunStatus.CANCELLED else "run.cancel_requested",
            "run:" + run_id,
            {"error_sha256": audit.digest(error)},
        )
        for (child_id,) in await self._all(
            f"SELECT id FROM runs WHERE parent_id = ? AND status IN {_ACTIVE}", (run_id,)
        ):
            await self._cancel_tree(child_id, plain, seal=seal)
        return result

    async def _cancel_erased(self, run_id: str, reason: str) -> None:
        """End a run whose data key was destroyed, whatever its status: it must never
        resume on payloads it can no longer read. Its children go with it."""
        error = erased_error(reason)
        row = await self._one(
            "UPDATE runs SET status = 'cancelled', error = ?, due_at = NULL, lease_owner = NULL,"
            " waiting_for = NULL, cancel_requested = 1, finished_at = ?, updated_at = ?"
            f" WHERE id = ? AND status IN {_ACTIVE} RETURNING parent_id",
            (error, self.now, self.now, run_id),
        )
        if row is None:
            return
        if self.keys is not None:
            self.keys.forget([run_id])
        await self._close_tasks(run_id)
        self.audit("run.cancelled", "run:" + run_id, {"reason": "payloads erased"})
        for (child_id,) in await self._all(
            f"SELECT id FROM runs WHERE parent_id = ? AND status IN {_ACTIVE}", (run_id,)
        ):
            await self._cancel_erased(child_id, reason)
        await self._notify_parent(run_id, "cancelled", None, error, row[0])

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
                        (
                            await self._seal(row[0], 0, "input", run.input),
                            self.now + run.debounce_ms,
                            self.now,
                            row[0],
                        ),
                    )
                return row[0], False
        now = run.created_at or self.now
        initiator = run.initiator
        subjects = list(run.subjects)
        if run.parent_id is not None:  # a child inherits who asked, and whom it is about
            row = await self._one("SELECT initiator FROM runs WHERE id = ?", (run.parent_id,))
            if initiator is None:
                initiator = None if row is None else row[0]
            subjects += [
                r[0]
                for r in await self._all(
                    "SELECT subject FROM run_subjects WHERE run_id = ?", (run.parent_id,)
                )
            ]
        subjects = sorted(set(subjects))
        key: payloads.DataKey | None = None
        stored_input = run.input
        if self.keys is not None:
            key = payloads.Keyring.new_key("run")
            stored_input = payloads.Keyring.seal(key, run.id, 0, "input", run.input)
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
                stored_input,
                run.idempotency_key,
                await self._input_hash(run),
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
        if key is not None or subjects:  # the run's key commits with the run
            await self._store_run_key(run.id, key, subjects)
        self.audit(
            "run.started",
            "run:" + run.id,
            {
                "workflow": run.workflow,
                "queue": run.queue,
                "input_sha256": audit.digest(stored_input),
                "idempotency_key": run.idempotency_key,
                "parent_id": run.parent_id,
                "initiator": initiator,
            },
        )
        await self.notify(run.queue)
        return run.id, True

    async def _store_run_key(
        self, run_id: str, key: payloads.DataKey | None, subjects: Sequence[str]
    ) -> None:
        """Write a run's subjects and its data key (wrapped by its subjects' keys, if it
        has subjects, else by the master key; None: encryption is off)."""
        if subjects:
            await self._many(
                "INSERT INTO run_subjects (run_id, subject) VALUES (?,?) ON CONFLICT DO NOTHING",
                [(run_id, s) for s in subjects],
            )
        if key is None or self.keys is None:
            return
        subject_keys = [await self._subject_key(s) for s in subjects]
        await self._insert_key(key, "run", run_id, subject_keys)
        self.keys.remember(run_id, key)

    async def _subject_key(self, subject: str) -> payloads.DataKey:
        """The live key of a data subject, created on first use (after an erasure, a new
        one: what was sealed before stays gone)."""
        assert self.keys is not None
        for _ in range(3):
            row = await self._one(
                "SELECT id, wrapped_by, wrapped FROM data_keys WHERE kind = 'subject'"
                " AND owner = ? AND wrapped IS NOT NULL",
                (subject,),
            )
            if row is not None:
                return self.keys.unwrap(row[0], "subject", subject, row[1], row[2])
            key = payloads.Keyring.new_key("subject")
            if await self._insert_key(key, "subject", subject):
                return key
        raise errors.StoreError(f"Could not create the data key of subject {subject!r}.")

    async def _input_hash(self, run: NewRun) -> str | None:
        """What identifies an idempotent start's input: a keyed hash (HMAC under the
        store's index key), never a plain hash that a guess could confirm."""
        if run.input_hash is None or self.keys is None:
            return run.input_hash
        await self._load_index()
        return self.keys.keyed_hash(run.input)

    async def keyed_digest(self, digest: str | None) -> str | None:
        """A digest of plaintext made fit for the audit: keyed (HMAC-SHA256 under the
        index key), so a guess of low-entropy personal data cannot be confirmed by it."""
        if digest is None or self.keys is None:
            return digest
        await self._load_index()
        return "hmac:" + self.keys.keyed_hash(digest)

    async def _load_index(self) -> None:
        """Load (or create) the store's index key into the keyring."""
        ring = self.keys
        assert ring is not None
        if ring.index is None:
            for _ in range(3):
                row = await self._one(
                    "SELECT id, wrapped_by, wrapped FROM data_keys WHERE kind = 'index'"
                    " AND owner = '' AND wrapped IS NOT NULL"
                )
                if row is not None:
                    ring.index = ring.unwrap(row[0], "index", "", row[1], row[2])
                    break
                key = payloads.Keyring.new_key("index")
                if await self._insert_key(key, "index", ""):
                    ring.index = key
                    break

    async def _by_key(self, run: NewRun) -> str | None:
        row = await self._one(
            "SELECT id, workflow, input_hash FROM runs WHERE idempotency_key = ?",
            (run.idempotency_key,),
        )
        if row is None:
            return None
        expected = await self._input_hash(run)
        if row[1] != run.workflow or (expected is not None and row[2] != expected):
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
            # checked apart only when the insert was refused. The result is sealed in
            # place, with the run's key from memory (no row copies, no round trip).
            r = rows[0]
            output, error = r.output, r.error
            ring = self.keys
            if ring is not None and (output is not None or error is not None):
                key = ring.cached(run_id) or await self._key(run_id)
                if key is not None:
                    seal = payloads.Keyring.seal
                    if output is not None:
                        output = seal(key, run_id, r.seq, "step.output", output)
                    if error is not None:
                        error = seal(key, run_id, r.seq, "step.error", error)
            changed = await self._run(
                INSERT_STEP_FENCED,
                (
                    run_id,
                    r.seq,
                    r.name,
                    r.kind,
                    r.status,
                    output,
                    error,
                    r.attempts,
                    r.started_at,
                    r.finished_at,
                    run_id,
                    owner,
                ),
            )
            if changed != 1:
                await self._fence(run_id, owner)
                raise Fenced(run_id)
            self._audit_step(run_id, r.seq, r.name, r.kind, r.status, output, error)
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
                payload = await self._open(run_id, 0, "signal:" + found[1], found[2])
                plain = payload
                if wait.kind == "any":
                    payload = (
                        '{"name":' + json.dumps(found[1]) + ',"payload":' + (plain or "null") + "}"
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
                return Resolved(None if plain is None else json.loads(plain), found[1])
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
        stored_error: str | None
        if status is RunStatus.CANCELLED and error is None:  # keep the reason cancel() stored
            row = await self._one("SELECT error FROM runs WHERE id = ?", (run_id,))
            if row and row[0]:
                stored_error = row[0]
                error = await self._open(run_id, 0, "error", row[0])
            else:
                error = json.dumps({"type": "Cancelled", "message": "cancelled"})
                stored_error = await self._seal(run_id, 0, "error", error)
        else:
            stored_error = await self._seal(run_id, 0, "error", error)
        stored_output = await self._seal(run_id, 0, "output", output)
        await self._run(
            "UPDATE runs SET status = ?, output = ?, error = ?, failed_seq = ?, due_at = NULL,"
            " lease_owner = NULL, waiting_for = NULL, finished_at = ?, updated_at = ?"
            " WHERE id = ?",
            (status.value, stored_output, stored_error, failed_seq, self.now, self.now, run_id),
        )
        self.audit(
            "run.finished",
            "run:" + run_id,
            {
                "status": status.value,
                "output_sha256": audit.digest(stored_output),
                "error_sha256": audit.digest(stored_error),
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
        stored = await self._deliver(run_id, name, payload)
        self.audit(
            "signal.sent", "run:" + run_id, {"name": name, "payload_sha256": audit.digest(stored)}
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
        # The fork gets a key of its own (about the same subjects): its payloads are opened
        # and sealed again for their new rows.
        stored_input = row[3]
        key: payloads.DataKey | None = None
        if self.keys is not None:
            plain_input = await self._open(run_id, 0, "input", row[3]) or "null"
            key = payloads.Keyring.new_key("run")
            stored_input = payloads.Keyring.seal(key, new_id, 0, "input", plain_input)
        await self._run(
            "INSERT INTO runs (id, workflow, queue, priority, status, input, concurrency_key,"
            " forked_from, forked_seq, due_at, created_at, updated_at)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?)",
            (
                new_id,
                row[0],
                row[1],
                row[2],
                stored_input,
                row[4],
                run_id,
                from_seq,
                self.now,
                self.now,
                self.now,
            ),
        )
        subjects = [
            r[0]
            for r in await self._all("SELECT subject FROM run_subjects WHERE run_id = ?", (run_id,))
        ]
        await self._store_run_key(new_id, key, subjects)
        if key is None:
            await self._run(
                f"INSERT INTO steps ({_STEP_COLUMNS}) SELECT ?, seq, name, kind, status, output,"
                " error, attempts, started_at, finished_at FROM steps WHERE run_id = ? AND seq < ?",
                (new_id, run_id, from_seq),
            )
        else:
            found = await sql_payloads.load(self.keys, self._all, self._list, [run_id])
            copied = [
                StepRow(
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    found.text(run_id, r[1], "step.output", r[5]),
                    found.text(run_id, r[1], "step.error", r[6]),
                    r[7],
                    r[8],
                    r[9],
                )
                for r in await self._all(
                    f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? AND seq < ? ORDER BY seq",
                    (run_id, from_seq),
                )
            ]
            sealed = await self._seal_rows(new_id, copied)
            if sealed:
                await self._many(INSERT_STEP, [_step_params(new_id, r) for r in sealed])
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
            keys = await sql_payloads.load(self.keys, self._all, self._list, list(claimed))
            if self.keys is not None:  # the store is the truth: drop keys it does not hold
                self.keys.forget([r for r in claimed if r not in keys.by_run])
            for run_id, got in keys.by_run.items():
                if isinstance(got, str):  # erased meanwhile: it never runs on garbage
                    await self._cancel_erased(run_id, got)
                    del claimed[run_id]
                else:
                    self.keys.remember(run_id, got)  # type: ignore[union-attr]
            if not claimed:
                return []
            ids = self._list(list(claimed))
            for c in claimed.values():
                c.input = keys.text(c.id, 0, "input", c.input) or "null"
            for r in await self._all(
                "SELECT run_id, seq, name, kind, status, output, error, started_at FROM steps"
                " WHERE run_id" + IN_LIST,
                (ids,),
            ):
                claimed[r[0]].history[r[1]] = HistoryRow(
                    r[2],
                    r[3],
                    r[4],
                    keys.text(r[0], r[1], "step.output", r[5]),
                    keys.text(r[0], r[1], "step.error", r[6]),
                    r[7],
                )
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

    keys: payloads.Keyring | None = None
    """Master keys and cached data keys (`open` loads them; None: encryption off)."""

    def _load_keys(self) -> None:
        """Load the master keys (creating the key file on first start), once."""
        if self.keys is None and not getattr(self, "_keys_loaded", False):
            masters = payloads.load_master_keys(self.url)
            self.keys = None if masters is None else payloads.Keyring(masters)
            self._keys_loaded = True

    async def run_keys(self, run_ids: Sequence[str]) -> sql_payloads.RunKeys:
        """The current data keys of some runs, to open their payloads."""
        return await sql_payloads.load(self.keys, self._read, self._list, run_ids)

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return run_from_row(rows[0], await self.run_keys([run_id])) if rows else None

    async def run_by_key(self, idempotency_key: str) -> RunRecord | None:
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE idempotency_key = ?", (idempotency_key,)
        )
        if not rows:
            return None
        return run_from_row(rows[0], await self.run_keys([str(rows[0][0])]))

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
        keys = await self.run_keys([r[0] for r in rows[:limit]])
        items = [run_from_row(r, keys) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(last[19], last[0])
        return Page(items, next_cursor)

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._read(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        keys = await self.run_keys([run_id])
        return [
            StepRecord(
                run_id=r[0],
                seq=r[1],
                name=r[2],
                kind=r[3],
                status=r[4],
                output=keys.json(run_id, r[1], "step.output", r[5]),
                error=keys.json(run_id, r[1], "step.error", r[6]),
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


def erased_error(reason: str) -> str:
    """The error of a run cancelled because its payloads were erased (stored unsealed)."""
    return json.dumps(
        {
            "type": "PayloadsErased",
            "message": f"{reason}: the run's payloads are gone, so it was cancelled "
            "rather than resumed.",
        }
    )


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
