"""The embedded store: one SQLite file in WAL mode.

Writes take the database's single write lock with ``BEGIN IMMEDIATE`` and never upgrade a
read transaction, so SQLite cannot answer with a deadlock. The connection's busy timeout is
zero: when another process holds the lock, the store waits with ``asyncio.sleep`` (the
event loop keeps serving heartbeats) and tries again, for up to ``busy_seconds`` (60 by
default), so callers never see "database is locked" under load.

URL: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, with options
``?synchronous=full|normal`` (default ``full``: a commit survives power loss; ``normal``
survives a crashed process but may lose the last commits on power loss).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flowdesk import errors
from flowdesk.store import base, migrations
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

SEP = "\x1f"
_LOST_RACE = json.dumps({"type": "Cancelled", "message": "another branch of wait_any won"})
CHILD_SIGNAL = "flowdesk.child:"

_RUN_COLUMNS = (
    "id, workflow, queue, priority, status, input, output, error, idempotency_key, parent_id, "
    "parent_seq, forked_from, forked_seq, attempts, cancel_requested, failed_seq, waiting_for, "
    "due_at, lease_owner, created_at, started_at, updated_at, finished_at, concurrency_key,"
    " deadline_at"
)


_INSERT_STEP = (
    "INSERT OR REPLACE INTO steps (run_id, seq, name, kind, status, output, error,"
    " attempts, started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
)


_INSERT_STEP_FENCED = (
    "INSERT OR REPLACE INTO steps (run_id, seq, name, kind, status, output, error,"
    " attempts, started_at, finished_at) SELECT ?,?,?,?,?,?,?,?,?,? WHERE EXISTS"
    " (SELECT 1 FROM runs WHERE id = ? AND lease_owner = ? AND status = 'running'"
    " AND cancel_requested = 0)"
)


_CLAIM_SET = (
    "UPDATE runs SET status = 'running', lease_owner = ?, due_at = ?,"
    " attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
    " updated_at = ?, waiting_for = NULL"
)
_CLAIM_RETURNING = " RETURNING id, workflow, input, attempts, cancel_requested, deadline_at"


def _pick_limited(
    conn: sqlite3.Connection, q: QueueLimits, workflows: str, now: int, room: int
) -> list[str]:
    """Ids of due runs of queue ``q`` that fit its limits now, best first. Runs whose lease
    expired are not counted as running: claiming them again is what recovers them."""
    if q.concurrency is not None:
        running = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE queue = ? AND status = 'running' AND due_at > ?",
            (q.name, now),
        ).fetchone()[0]
        room = min(room, q.concurrency - running)
    if room <= 0:
        return []
    starts_left: int | None = None
    if q.rate is not None:
        started = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE queue = ? AND started_at > ?",
            (q.name, now - q.rate_window_ms),
        ).fetchone()[0]
        starts_left = q.rate - started
    candidates = conn.execute(
        "SELECT id, concurrency_key, started_at IS NULL FROM runs WHERE queue = ?"
        " AND due_at <= ? AND workflow IN (SELECT value FROM json_each(?))"
        " ORDER BY priority DESC, due_at LIMIT ?",
        (q.name, now, workflows, room * 4 + 64),
    ).fetchall()
    per_key: dict[str, int] = {}
    picked: list[str] = []
    for run_id, key, fresh in candidates:
        if len(picked) >= room:
            break
        if fresh and starts_left is not None and starts_left <= 0:
            continue
        if key is not None and q.per_key_concurrency is not None:
            if key not in per_key:
                per_key[key] = conn.execute(
                    "SELECT COUNT(*) FROM runs WHERE queue = ? AND concurrency_key = ?"
                    " AND status = 'running' AND due_at > ?",
                    (q.name, key, now),
                ).fetchone()[0]
            if per_key[key] >= q.per_key_concurrency:
                continue
            per_key[key] += 1
        if fresh and starts_left is not None:
            starts_left -= 1
        picked.append(run_id)
    return picked


def now_ms() -> int:
    return int(time.time() * 1000)


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """``sqlite:///x.db?synchronous=normal`` -> ("x.db", {"synchronous": "normal"})."""
    if not url.startswith("sqlite:"):
        return url, {}
    parts = urlsplit(url)
    path = parts.path
    # The path after "sqlite://" keeps one "/" too many: "/x.db" (relative), "//tmp/x.db".
    if path.startswith("/"):
        path = path[1:]
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not path:
        raise errors.ConfigurationError(f"No file in database URL {url!r}.")
    return path, options


_SCHEDULE_COLUMNS = "name, workflow, cron, catchup, paused, last_tick, next_tick"


def _schedule_from_row(row: sqlite3.Row) -> ScheduleRecord:
    return ScheduleRecord(
        name=row[0],
        workflow=row[1],
        cron=row[2],
        catchup=row[3],
        paused=bool(row[4]),
        last_tick=base.ms_to_dt(row[5]),
        next_tick=base.ms_to_dt(row[6]),  # type: ignore[arg-type]
    )


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        workflow=row["workflow"],
        queue=row["queue"],
        priority=row["priority"],
        status=RunStatus(row["status"]),
        input=json.loads(row["input"]),
        output=None if row["output"] is None else json.loads(row["output"]),
        error=None if row["error"] is None else json.loads(row["error"]),
        idempotency_key=row["idempotency_key"],
        parent_id=row["parent_id"],
        parent_seq=row["parent_seq"],
        forked_from=row["forked_from"],
        forked_seq=row["forked_seq"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        failed_seq=row["failed_seq"],
        waiting_for=row["waiting_for"].split(SEP) if row["waiting_for"] else [],
        due_at=base.ms_to_dt(row["due_at"]),
        lease_owner=row["lease_owner"],
        created_at=base.ms_to_dt(row["created_at"]),  # type: ignore[arg-type]
        started_at=base.ms_to_dt(row["started_at"]),
        updated_at=base.ms_to_dt(row["updated_at"]),  # type: ignore[arg-type]
        finished_at=base.ms_to_dt(row["finished_at"]),
        concurrency_key=row["concurrency_key"],
        deadline_at=base.ms_to_dt(row["deadline_at"]),
    )


class _Tx(base.Tx):
    def __init__(self, conn: sqlite3.Connection, now: int) -> None:
        self.c = conn
        self.now = now

    # -- helpers ---------------------------------------------------------------------
    def _fence(self, run_id: str, owner: str, *, allow_cancel: bool = False) -> None:
        row = self.c.execute(
            "SELECT lease_owner, status, cancel_requested FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None or row[0] != owner or row[1] != "running":
            raise Fenced(run_id)
        if row[2] and not allow_cancel:
            raise Fenced(run_id, "cancel")

    def _write_rows(self, run_id: str, rows: Sequence[StepRow], versions: dict[str, int]) -> None:
        if len(rows) == 1:
            r = rows[0]
            self.c.execute(
                _INSERT_STEP,
                (
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
                ),
            )
        elif rows:
            self.c.executemany(
                _INSERT_STEP,
                [
                    (
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
                    for r in rows
                ],
            )
        if versions:
            self.c.executemany(
                "INSERT OR IGNORE INTO versions (run_id, change_id, version) VALUES (?,?,?)",
                [(run_id, k, v) for k, v in versions.items()],
            )

    def _deliver(self, run_id: str, name: str, payload: str | None) -> None:
        self.c.execute(
            "INSERT INTO signals (run_id, name, payload, sent_at) VALUES (?,?,?,?)",
            (run_id, name, payload, self.now),
        )
        row = self.c.execute(
            "SELECT status, waiting_for FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row and row[0] == "waiting" and row[1] and name in row[1].split(SEP):
            self.c.execute(
                "UPDATE runs SET status = 'queued', due_at = ?, waiting_for = NULL,"
                " updated_at = ? WHERE id = ?",
                (self.now, self.now, run_id),
            )

    def _notify_parent(
        self, run_id: str, status: str, output: str | None, error: str | None
    ) -> None:
        row = self.c.execute("SELECT parent_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row and row[0]:
            parent_status = self.c.execute(
                "SELECT status FROM runs WHERE id = ?", (row[0],)
            ).fetchone()
            if parent_status and not RunStatus(parent_status[0]).finished:
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
                self._deliver(row[0], CHILD_SIGNAL + run_id, payload)

    def _cancel_tree(self, run_id: str, error: str) -> RunStatus:
        row = self.c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise errors.RunNotFound(run_id)
        status = RunStatus(row[0])
        if status.finished:
            return status
        if status is RunStatus.RUNNING:
            self.c.execute(
                "UPDATE runs SET cancel_requested = 1, error = ?, updated_at = ? WHERE id = ?",
                (error, self.now, run_id),
            )
            result = RunStatus.RUNNING
        else:
            self.c.execute(
                "UPDATE runs SET status = 'cancelled', error = ?, due_at = NULL,"
                " lease_owner = NULL, waiting_for = NULL, finished_at = ?, updated_at = ?"
                " WHERE id = ?",
                (error, self.now, self.now, run_id),
            )
            self._notify_parent(run_id, "cancelled", None, error)
            result = RunStatus.CANCELLED
        children = self.c.execute(
            "SELECT id FROM runs WHERE parent_id = ? AND status IN ('queued','running','waiting')",
            (run_id,),
        ).fetchall()
        for (child_id,) in children:
            self._cancel_tree(child_id, error)
        return result

    # -- operations ------------------------------------------------------------------
    async def create_run(self, run: NewRun) -> tuple[str, bool]:
        if run.parent_id is not None:  # a child's id is derived from (parent, seq)
            if self.c.execute("SELECT 1 FROM runs WHERE id = ?", (run.id,)).fetchone():
                return run.id, False
        if run.idempotency_key is not None:
            row = self.c.execute(
                "SELECT id, workflow, input_hash FROM runs WHERE idempotency_key = ?",
                (run.idempotency_key,),
            ).fetchone()
            if row is not None:
                if row[1] != run.workflow or (
                    run.input_hash is not None and row[2] != run.input_hash
                ):
                    raise errors.IdempotencyConflict(
                        f"Idempotency key {run.idempotency_key!r} was already used by run "
                        f"{row[0]} of workflow {row[1]!r} with "
                        f"{'another workflow' if row[1] != run.workflow else 'different input'}"
                        ". Use a new key for new work."
                    )
                return row[0], False
        if run.dedupe_key is not None:
            row = self.c.execute(
                "SELECT id, workflow FROM runs WHERE dedupe_key = ? AND status = 'queued'",
                (run.dedupe_key,),
            ).fetchone()
            if row is not None and row[1] == run.workflow:
                if run.debounce_ms is not None:  # the latest start wins and waits again
                    self.c.execute(
                        "UPDATE runs SET input = ?, due_at = ?, updated_at = ? WHERE id = ?",
                        (run.input, self.now + run.debounce_ms, self.now, row[0]),
                    )
                return row[0], False
        now = run.created_at or self.now
        self.c.execute(
            "INSERT INTO runs (id, workflow, queue, priority, status, input, idempotency_key,"
            " input_hash, parent_id, parent_seq, due_at, created_at, updated_at,"
            " concurrency_key, dedupe_key, deadline_at)"
            " VALUES (?,?,?,?,'queued',?,?,?,?,?,?,?,?,?,?,?)",
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
            ),
        )
        return run.id, True

    async def record(
        self, run_id: str, owner: str, rows: Sequence[StepRow], versions: dict[str, int]
    ) -> None:
        if len(rows) == 1 and not versions:
            # The hot path (one step result): the fence is folded into the insert, and
            # checked apart only when the insert was refused.
            r = rows[0]
            inserted = self.c.execute(
                _INSERT_STEP_FENCED,
                (
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
                    run_id,
                    owner,
                ),
            ).rowcount
            if inserted != 1:
                self._fence(run_id, owner)
                raise Fenced(run_id)  # pragma: no cover - the fence above raises first
            return
        self._fence(run_id, owner)
        self._write_rows(run_id, rows, versions)

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
    ) -> AwaitOutcome:
        self._fence(run_id, owner)
        self._write_rows(run_id, rows, versions)
        for child in children:
            await self.create_run(child)
        if signals:
            found = self.c.execute(
                "SELECT id, name, payload FROM signals WHERE run_id = ? AND consumed_seq IS NULL"
                " AND name IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 1",
                (run_id, json.dumps(list(signals))),
            ).fetchone()
            if found is not None:
                self.c.execute(
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
                self._write_rows(run_id, [done], {})
                for name, child_id in (losers or {}).items():
                    if name != found[1]:
                        self._cancel_tree(child_id, _LOST_RACE)
                return Resolved(None if found[2] is None else json.loads(found[2]), found[1])
        if deadline is not None and deadline <= self.now:
            return Expired()
        self._write_rows(run_id, [wait], {})
        self.c.execute(
            "UPDATE runs SET status = 'waiting', lease_owner = NULL, due_at = CASE"
            " WHEN deadline_at IS NOT NULL AND (? IS NULL OR deadline_at < ?) THEN deadline_at"
            " ELSE ? END, waiting_for = ?, updated_at = ? WHERE id = ?",
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
        self._fence(run_id, owner, allow_cancel=True)
        self._write_rows(run_id, rows, versions)
        if status is RunStatus.CANCELLED and error is None:  # keep the reason cancel() stored
            row = self.c.execute("SELECT error FROM runs WHERE id = ?", (run_id,)).fetchone()
            error = (
                row[0]
                if row and row[0]
                else json.dumps({"type": "Cancelled", "message": "cancelled"})
            )
        self.c.execute(
            "UPDATE runs SET status = ?, output = ?, error = ?, failed_seq = ?, due_at = NULL,"
            " lease_owner = NULL, waiting_for = NULL, finished_at = ?, updated_at = ?"
            " WHERE id = ?",
            (status.value, output, error, failed_seq, self.now, self.now, run_id),
        )
        if status is RunStatus.CANCELLED:
            for (child_id,) in self.c.execute(
                "SELECT id FROM runs WHERE parent_id = ? AND status IN"
                " ('queued','running','waiting')",
                (run_id,),
            ).fetchall():
                self._cancel_tree(child_id, error or "null")
        self._notify_parent(run_id, status.value, output, error)

    async def release(self, run_id: str, owner: str) -> None:
        self.c.execute(
            "UPDATE runs SET status = 'queued', lease_owner = NULL, due_at = ?, updated_at = ?"
            " WHERE id = ? AND lease_owner = ? AND status = 'running'",
            (self.now, self.now, run_id, owner),
        )

    async def signal(self, run_id: str, name: str, payload: str | None) -> None:
        row = self.c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise errors.RunNotFound(run_id)
        if RunStatus(row[0]).finished:
            raise errors.InvalidState(
                f"Run {run_id} is {row[0]}: only queued, running or waiting runs accept "
                f"signals (signal {name!r} was not stored)."
            )
        self._deliver(run_id, name, payload)

    async def cancel(self, run_id: str, reason: str, kind: str = "Cancelled") -> RunStatus:
        row = self.c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise errors.RunNotFound(run_id)
        if row[0] in ("succeeded", "failed"):
            raise errors.InvalidState(f"Run {run_id} already {row[0]}; it cannot be cancelled.")
        error = json.dumps({"type": kind, "message": reason})
        return self._cancel_tree(run_id, error)

    async def retry(self, run_id: str) -> None:
        self._retry_run(run_id)

    def _retry_run(self, run_id: str) -> None:
        row = self.c.execute(
            "SELECT status, failed_seq FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise errors.RunNotFound(run_id)
        if row[0] != "failed":
            raise errors.InvalidState(f"Run {run_id} is {row[0]}: only failed runs can be retried.")
        if row[1] is not None:
            # A failed child at or after the failed step is retried with its parent: its
            # failure notice is dropped so the replayed parent waits for the new outcome.
            for (child_id,) in self.c.execute(
                "SELECT id FROM runs WHERE parent_id = ? AND parent_seq >= ? AND status = 'failed'",
                (run_id, row[1]),
            ).fetchall():
                self.c.execute(
                    "DELETE FROM signals WHERE run_id = ? AND name = ?",
                    (run_id, CHILD_SIGNAL + child_id),
                )
                self._retry_run(child_id)
            self.c.execute("DELETE FROM steps WHERE run_id = ? AND seq >= ?", (run_id, row[1]))
            self.c.execute(
                "UPDATE signals SET consumed_seq = NULL WHERE run_id = ? AND consumed_seq >= ?",
                (run_id, row[1]),
            )
        self.c.execute(
            "UPDATE runs SET status = 'queued', output = NULL, error = NULL, failed_seq = NULL,"
            " cancel_requested = 0, due_at = ?, finished_at = NULL, updated_at = ?"
            " WHERE id = ?",
            (self.now, self.now, run_id),
        )

    async def fork(self, run_id: str, from_seq: int, new_id: str) -> int:
        row = self.c.execute(
            "SELECT workflow, queue, priority, input, concurrency_key FROM runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise errors.RunNotFound(run_id)
        if from_seq < 1:
            raise errors.FlowdeskError(f"Fork from seq {from_seq}: steps are numbered from 1.")
        pending = self.c.execute(
            "SELECT MIN(seq) FROM steps WHERE run_id = ? AND status = 'pending'", (run_id,)
        ).fetchone()[0]
        if pending is not None and pending < from_seq:
            from_seq = pending  # a wait not yet over cannot be copied: fork before it
        self.c.execute(
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
        self.c.execute(
            "INSERT INTO steps (run_id, seq, name, kind, status, output, error, attempts,"
            " started_at, finished_at) SELECT ?, seq, name, kind, status, output, error,"
            " attempts, started_at, finished_at FROM steps WHERE run_id = ? AND seq < ?",
            (new_id, run_id, from_seq),
        )
        self.c.execute(
            "INSERT INTO versions (run_id, change_id, version)"
            " SELECT ?, change_id, version FROM versions WHERE run_id = ?",
            (new_id, run_id),
        )
        return from_seq

    async def sync_schedule(
        self, name: str, workflow: str, cron: str, catchup: str, next_tick: int
    ) -> ScheduleRecord:
        self.c.execute(
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
        row = self.c.execute(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _schedule_from_row(row)

    async def advance_schedule(self, name: str, last_tick: int | None, next_tick: int) -> None:
        self.c.execute(
            "UPDATE schedules SET last_tick = COALESCE(?, last_tick), next_tick = ?,"
            " updated_at = ? WHERE name = ?",
            (last_tick, next_tick, self.now, name),
        )

    async def pause_schedule(self, name: str, paused: bool) -> None:
        updated = self.c.execute(
            "UPDATE schedules SET paused = ?, updated_at = ? WHERE name = ?",
            (int(paused), self.now, name),
        ).rowcount
        if not updated:
            raise errors.NotFound(
                f"No schedule {name!r}. List them with `flowdesk schedules list`."
            )

    async def overdue(self, limit: int) -> list[str]:
        rows = self.c.execute(
            "SELECT id FROM runs WHERE deadline_at <= ? AND deadline_at IS NOT NULL"
            " AND status IN ('queued', 'waiting') LIMIT ?",
            (self.now, limit),
        ).fetchall()
        return [r[0] for r in rows]


class SQLiteStore(base.Store):
    def __init__(self, url: str, *, busy_seconds: float = 60.0) -> None:
        self.url = url
        path, options = parse_url(url)
        self.path = path
        sync = options.get("synchronous", "full").lower()
        if sync not in ("full", "normal", "off", "extra"):
            raise errors.ConfigurationError(f"synchronous={sync!r} in {url!r}: use full or normal.")
        self.synchronous = sync
        self.busy_seconds = float(options.get("busy_seconds", busy_seconds))
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    # -- connection ------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise errors.StoreError("The store is not open: call `await app.open()` first.")
        return self._conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        _check_folder(self.path)
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise errors.StoreError(f"Cannot open SQLite database {self.path!r}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            await self._retry(lambda: migrations.check_owner(conn, self.path))
            await self._retry(lambda: self._configure(conn))
            await self._retry(lambda: migrations.migrate_sqlite(conn, self.path))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise errors.StoreError(
                f"{self.path!r} is not a flowdesk database (SQLite says: {exc}). "
                "Point FLOWDESK_DATABASE_URL at a new file or at a flowdesk database."
            ) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:":
            raise errors.StoreError(f"Could not switch {self.path!r} to WAL mode (got {mode}).")
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -16000")

    async def close(self) -> None:
        if self._conn is not None:
            async with self._lock:
                self._conn.close()
                self._conn = None

    async def _retry(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` until SQLite stops answering busy, sleeping between tries."""
        deadline = time.monotonic() + self.busy_seconds
        delay = 0.0005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    if _is_busy(exc):
                        raise errors.StoreError(
                            f"SQLite stayed locked for {self.busy_seconds:.0f} s: another "
                            f"process holds {self.path!r} too long."
                        ) from exc
                    raise
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.02)

    async def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction."""
        async with self._lock:
            conn = self.conn
            await self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        conn = self.conn
        rows: list[sqlite3.Row] = await self._retry(lambda: conn.execute(sql, params).fetchall())
        return rows

    # -- writes ----------------------------------------------------------------------
    async def transact(self, work: Sequence[Callable[[base.Tx], Awaitable[Any]]]) -> list[Any]:
        async with self._lock:
            conn = self.conn
            await self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            return self._apply(conn, work)

    def transact_now(self, work: Sequence[Callable[[base.Tx], Awaitable[Any]]]) -> list[Any] | None:
        """`transact` without leaving the caller's turn of the event loop, when the write
        lock can be had at once; None when it cannot (then use `transact`)."""
        if self._lock.locked():
            return None
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return None
            raise
        return self._apply(conn, work)

    def _apply(
        self, conn: sqlite3.Connection, work: Sequence[Callable[[base.Tx], Awaitable[Any]]]
    ) -> list[Any]:
        """Apply operations inside the open transaction, then commit. SQLite operations
        never suspend, so each coroutine is driven to its end in place."""
        tx = _Tx(conn, now_ms())
        results: list[Any] = []
        single = len(work) == 1
        try:
            for op in work:
                if not single:
                    conn.execute("SAVEPOINT op")
                try:
                    results.append(_drive(op(tx)))
                except sqlite3.OperationalError:
                    raise
                except Exception as exc:  # one refused operation; keep the others
                    if single:
                        conn.execute("ROLLBACK")
                        return [exc]
                    conn.execute("ROLLBACK TO op")
                    results.append(exc)
                if not single:
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

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
        now = now_ms()
        limits = limits or {}
        limited = [limits[q] for q in queues if q in limits and limits[q].limited]
        free = json.dumps([q for q in queues if not (q in limits and limits[q].limited)])
        ws = json.dumps(list(workflows))
        lease = now + lease_ms

        def body(conn: sqlite3.Connection) -> list[Claimed]:
            rows: list[sqlite3.Row] = []
            picked: list[str] = []
            for queue in limited:
                if len(picked) >= limit:
                    break
                picked += _pick_limited(conn, queue, ws, now, limit - len(picked))
            if picked:
                rows += conn.execute(
                    _CLAIM_SET + " WHERE id IN (SELECT value FROM json_each(?))" + _CLAIM_RETURNING,
                    (owner, lease, now, now, json.dumps(picked)),
                ).fetchall()
            if len(rows) < limit and free != "[]":
                rows += conn.execute(
                    _CLAIM_SET + " WHERE id IN (SELECT id FROM runs WHERE due_at <= ?"
                    "  AND queue IN (SELECT value FROM json_each(?))"
                    "  AND workflow IN (SELECT value FROM json_each(?))"
                    "  ORDER BY priority DESC, due_at LIMIT ?)" + _CLAIM_RETURNING,
                    (owner, lease, now, now, now, free, ws, limit - len(rows)),
                ).fetchall()
            claimed = {r[0]: Claimed(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows}
            if claimed:
                ids = json.dumps(list(claimed))
                for r in conn.execute(
                    "SELECT run_id, seq, name, kind, status, output, error, started_at FROM steps"
                    " WHERE run_id IN (SELECT value FROM json_each(?))",
                    (ids,),
                ):
                    claimed[r[0]].history[r[1]] = HistoryRow(r[2], r[3], r[4], r[5], r[6], r[7])
                for r in conn.execute(
                    "SELECT run_id, change_id, version FROM versions"
                    " WHERE run_id IN (SELECT value FROM json_each(?))",
                    (ids,),
                ):
                    claimed[r[0]].versions[r[1]] = r[2]
            return list(claimed.values())

        result: list[Claimed] = await self._write(body)
        return result

    async def has_due(self, queues: Sequence[str], workflows: Sequence[str]) -> bool:
        rows = await self._read(
            "SELECT 1 FROM runs WHERE due_at <= ? AND queue IN (SELECT value FROM json_each(?))"
            " AND workflow IN (SELECT value FROM json_each(?)) LIMIT 1",
            (now_ms(), json.dumps(list(queues)), json.dumps(list(workflows))),
        )
        return bool(rows)

    async def heartbeat(
        self, owner: str, run_ids: Sequence[str], lease_ms: int, info: dict[str, Any]
    ) -> tuple[set[str], set[str]]:
        now = now_ms()
        ids = json.dumps(list(run_ids))

        def body(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
            rows = conn.execute(
                "UPDATE runs SET due_at = ? WHERE lease_owner = ? AND status = 'running'"
                " AND id IN (SELECT value FROM json_each(?)) RETURNING id, cancel_requested",
                (now + lease_ms, owner, ids),
            ).fetchall()
            conn.execute(
                "INSERT INTO workers (id, host, pid, queues, concurrency, started_at,"
                " heartbeat_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at",
                (
                    owner,
                    info.get("host", socket.gethostname()),
                    info.get("pid", os.getpid()),
                    ",".join(info.get("queues", [])),
                    info.get("concurrency", 0),
                    info.get("started_at", now),
                    now,
                ),
            )
            return {r[0] for r in rows}, {r[0] for r in rows if r[1]}

        result: tuple[set[str], set[str]] = await self._write(body)
        return result

    async def schedules(self) -> list[ScheduleRecord]:
        rows = await self._read(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules ORDER BY name")
        return [_schedule_from_row(r) for r in rows]

    async def due_schedules(self) -> list[str]:
        rows = await self._read(
            "SELECT name FROM schedules WHERE paused = 0 AND next_tick <= ?", (now_ms(),)
        )
        return [r[0] for r in rows]

    async def forget_worker(self, owner: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM workers WHERE id = ?", (owner,)))

    # -- reads -----------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return _run_from_row(rows[0]) if rows else None

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
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit + 1),
        )
        items = [_run_from_row(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(last["created_at"], last["id"])
        return Page(items, next_cursor)

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._read(
            "SELECT run_id, seq, name, kind, status, output, error, attempts, started_at,"
            " finished_at FROM steps WHERE run_id = ? ORDER BY seq",
            (run_id,),
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

    async def workers(self) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT id, host, pid, queues, concurrency, started_at, heartbeat_at FROM workers"
            " ORDER BY started_at"
        )
        return [dict(r) for r in rows]


def _drive(coro: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends to its end and return its value."""
    try:
        coro.send(None)  # type: ignore[attr-defined]
    except StopIteration as stop:
        return stop.value
    coro.close()  # type: ignore[attr-defined]
    raise RuntimeError("a SQLite store operation suspended; it must not await")


def _check_folder(path: str) -> None:
    if path != ":memory:":
        parent = Path(path).expanduser().resolve().parent
        if not parent.exists():
            raise errors.ConfigurationError(
                f"Cannot create database {path!r}: folder {parent} does not exist."
            )


def encode_cursor(created_at: int, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        created, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().split(":", 1)
        return int(created), run_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.FlowdeskError(f"Invalid cursor {cursor!r}.") from exc


def input_hash(encoded_input: str) -> str:
    return hashlib.sha256(encoded_input.encode()).hexdigest()[:32]
