"""What the web UI reads and writes: passwords, sign-in sessions, failed sign-ins, the
figures of the dashboard and the filtered audit list, once for every dialect (same
conventions as `sql.py`).

Passwords arrive here already hashed (argon2, `flowdesk.server.ui.auth`); sessions are
stored by the SHA-256 of their cookie secret. Failed sign-ins are counted per key (an
account or a client address) for `flowdesk.server.ui.throttle`, which decides the policy
and passes its own clock's times. Dashboard reads look at a recent window only
(``since``, epoch ms) and cap the rows they fetch, so a page load stays cheap on a big
database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowdesk import errors
from flowdesk.store import base, sql


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    user_id: str
    csrf: str
    created_at: int
    expires_at: int
    ended_at: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSample:
    """One model call of the ledger, as the dashboard charts it."""

    at: int
    task: str
    model: str
    status: str
    latency_ms: float
    confidence: float | None
    cost_usd: float
    run_id: str | None
    workflow: str | None


class UiTx(sql.SqlTx):
    async def set_password(self, user_id: str, password_hash: str | None) -> None:
        """Set (or clear, with None) a user's password; their open sessions end."""
        changed = await self._run(
            "UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ?",
            (password_hash, self.now, user_id),
        )
        if not changed:
            raise errors.NotFound(f"No user {user_id!r}. Create it with `flowdesk users create`.")
        await self._run(
            "UPDATE ui_sessions SET ended_at = ? WHERE user_id = ? AND ended_at IS NULL",
            (self.now, user_id),
        )
        self.audit(
            "user.password_set" if password_hash else "user.password_cleared",
            "user:" + user_id,
            {},
        )

    async def start_session(
        self, secret_hash: str, user_id: str, csrf: str, expires_at: int
    ) -> None:
        await self._run(
            "INSERT INTO ui_sessions (secret_hash, user_id, csrf, created_at, expires_at)"
            " VALUES (?,?,?,?,?)",
            (secret_hash, user_id, csrf, self.now, expires_at),
        )
        self.audit("user.signed_in", "user:" + user_id, {"expires_at": expires_at}, user_id)

    async def end_session(self, secret_hash: str) -> None:
        row = await self._one(
            "UPDATE ui_sessions SET ended_at = ? WHERE secret_hash = ? AND ended_at IS NULL"
            " RETURNING user_id",
            (self.now, secret_hash),
        )
        if row is not None:
            self.audit("user.signed_out", "user:" + str(row[0]), {}, str(row[0]))

    async def prune_sessions(self, before: int) -> int:
        """Forget sessions that expired or ended before ``before`` (epoch ms)."""
        return await self._run(
            "DELETE FROM ui_sessions WHERE expires_at < ? OR ended_at < ?", (before, before)
        )

    # -- failed sign-ins -------------------------------------------------------------------
    async def count_signin_failure(self, key: str, now: int, forget_at: int) -> int:
        """Count one more failed sign-in of ``key``: the streak's length now. A row past its
        ``forget_at`` starts a new streak of 1 that is forgotten at ``forget_at``. The
        upsert locks the row (PostgreSQL) until commit, so servers counting the same key
        take turns and none loses a failure."""
        row = await self._one(
            "INSERT INTO ui_signin_failures (key, failures, locked_until, forget_at)"
            " VALUES (?, 1, 0, ?) ON CONFLICT (key) DO UPDATE SET"
            " failures = CASE WHEN ui_signin_failures.forget_at <= ? THEN 1"
            " ELSE ui_signin_failures.failures + 1 END,"
            " locked_until = CASE WHEN ui_signin_failures.forget_at <= ? THEN 0"
            " ELSE ui_signin_failures.locked_until END,"
            " forget_at = CASE WHEN ui_signin_failures.forget_at <= ? THEN excluded.forget_at"
            " ELSE ui_signin_failures.forget_at END"
            " RETURNING failures",
            (key, forget_at, now, now, now),
        )
        assert row is not None  # an upsert always returns its row
        return int(row[0])

    async def lock_signin(self, key: str, locked_until: int, forget_at: int) -> None:
        """Refuse sign-ins of ``key`` until ``locked_until``; keep its streak until
        ``forget_at``."""
        await self._run(
            "UPDATE ui_signin_failures SET locked_until = ?, forget_at = ? WHERE key = ?",
            (locked_until, forget_at, key),
        )

    async def clear_signin_failures(self, key: str) -> None:
        await self._run("DELETE FROM ui_signin_failures WHERE key = ?", (key,))

    async def prune_signin_failures(self, now: int) -> int:
        """Forget the streaks that ended (past their ``forget_at``)."""
        return await self._run("DELETE FROM ui_signin_failures WHERE forget_at <= ?", (now,))


class UiStore(sql.SqlStore):
    async def find_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> base.Page:
        """Runs newest first, like `list_runs`, also filtered by creation time (epoch ms,
        ``since`` inclusive, ``until`` exclusive)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column, value in (("status", status), ("workflow", workflow)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        if until is not None:
            where.append("created_at < ?")
            params.append(until)
        if cursor:
            created, run_id = sql.decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created, created, run_id]
        limit = max(1, min(limit, 500))
        rows = await self._read(
            f"SELECT {sql.RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit + 1),
        )
        items = [sql.run_from_row(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]  # created_at is column 19 of RUN_COLUMNS, as in list_runs
            next_cursor = sql.encode_cursor(int(last[19]), str(last[0]))
        return base.Page(items, next_cursor)

    async def workflows(self) -> list[str]:
        """The names of workflows that have runs."""
        rows = await self._read("SELECT DISTINCT workflow FROM runs ORDER BY workflow")
        return [str(r[0]) for r in rows]

    async def session(self, secret_hash: str) -> SessionRecord | None:
        rows = await self._read(
            "SELECT user_id, csrf, created_at, expires_at, ended_at FROM ui_sessions"
            " WHERE secret_hash = ?",
            (secret_hash,),
        )
        if not rows:
            return None
        r = rows[0]
        return SessionRecord(
            user_id=str(r[0]),
            csrf=str(r[1]),
            created_at=int(r[2]),
            expires_at=int(r[3]),
            ended_at=None if r[4] is None else int(r[4]),
        )

    async def signin_locked_until(self, keys: Sequence[str], now: int) -> int:
        """The latest lockout of ``keys`` still in force at ``now`` (epoch ms), else 0."""
        rows = await self._read(
            "SELECT MAX(locked_until) FROM ui_signin_failures WHERE key"
            + sql.IN_LIST
            + " AND locked_until > ?",
            (self._list(keys), now),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    async def runs_per_minute(self, since: int) -> list[tuple[int, str, int]]:
        """``(minute start ms, "started" | final status, count)`` since ``since``."""
        started = await self._read(
            "SELECT (created_at / 60000) * 60000, COUNT(*) FROM runs WHERE created_at >= ?"
            " GROUP BY (created_at / 60000) * 60000",
            (since,),
        )
        finished = await self._read(
            "SELECT (finished_at / 60000) * 60000, status, COUNT(*) FROM runs"
            " WHERE finished_at >= ? GROUP BY (finished_at / 60000) * 60000, status",
            (since,),
        )
        out = [(int(r[0]), "started", int(r[1])) for r in started]
        out += [(int(r[0]), str(r[1]), int(r[2])) for r in finished]
        return out

    async def run_counts(self, since: int) -> dict[str, int]:
        """Active runs per status, and runs that finished since ``since`` per final status
        (two index range scans: never the whole table)."""
        rows = await self._read(
            "SELECT status, COUNT(*) FROM runs WHERE status IN ('queued', 'running', 'waiting')"
            " GROUP BY status"
        )
        rows += await self._read(
            "SELECT status, COUNT(*) FROM runs WHERE finished_at >= ? GROUP BY status", (since,)
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def step_durations(self, since: int, limit: int = 5000) -> list[tuple[str, int, int]]:
        """``(step name, duration ms, attempts)`` of the latest steps finished since
        ``since``: steps of runs still active or finished since then (found by index)."""
        rows = await self._read(
            "SELECT name, finished_at - started_at, attempts FROM steps"
            " WHERE kind = 'step' AND finished_at >= ? AND status <> 'pending'"
            " AND run_id IN (SELECT id FROM runs WHERE finished_at >= ?"
            " UNION SELECT id FROM runs WHERE status IN ('queued', 'running', 'waiting'))"
            " ORDER BY finished_at DESC LIMIT ?",
            (since, since, limit),
        )
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    async def model_samples(self, since: int, limit: int = 5000) -> list[ModelSample]:
        rows = await self._read(
            "SELECT at, task, model, status, latency_ms, confidence, cost_usd, run_id, workflow"
            " FROM model_ledger WHERE at >= ? ORDER BY at DESC LIMIT ?",
            (since, limit),
        )
        return [
            ModelSample(
                at=int(r[0]),
                task=str(r[1]),
                model=str(r[2]),
                status=str(r[3]),
                latency_ms=float(r[4]),
                confidence=None if r[5] is None else float(r[5]),
                cost_usd=float(r[6]),
                run_id=None if r[7] is None else str(r[7]),
                workflow=None if r[8] is None else str(r[8]),
            )
            for r in rows
        ]

    async def late_completions(self, since: int) -> int:
        """Tasks completed after their due time, since ``since``."""
        rows = await self._read(
            "SELECT COUNT(*) FROM tasks WHERE completed_at >= ? AND due_at IS NOT NULL"
            " AND completed_at > due_at",
            (since,),
        )
        return int(rows[0][0]) if rows else 0

    async def run_model_calls(self, run_id: str) -> list[tuple[int | None, ModelSample]]:
        """``(seq, call)`` of one run, oldest first."""
        rows = await self._read(
            "SELECT seq, at, task, model, status, latency_ms, confidence, cost_usd, run_id,"
            " workflow FROM model_ledger WHERE run_id = ? ORDER BY id LIMIT 1000",
            (run_id,),
        )
        return [
            (
                None if r[0] is None else int(r[0]),
                ModelSample(
                    at=int(r[1]),
                    task=str(r[2]),
                    model=str(r[3]),
                    status=str(r[4]),
                    latency_ms=float(r[5]),
                    confidence=None if r[6] is None else float(r[6]),
                    cost_usd=float(r[7]),
                    run_id=None if r[8] is None else str(r[8]),
                    workflow=None if r[9] is None else str(r[9]),
                ),
            )
            for r in rows
        ]

    async def audit_page(
        self,
        *,
        before_seq: int | None = None,
        actor: str | None = None,
        action: str | None = None,
        subject: str | None = None,
        limit: int = 50,
    ) -> list[Sequence[Any]]:
        """Audit rows ``(seq, at, actor, action, subject, data, hash)``, newest first,
        filtered (``action`` and ``subject`` match as prefixes)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        if actor:
            where.append("actor = ?")
            params.append(actor)
        for column, value in (("action", action), ("subject", subject)):
            if value:
                where.append(f"SUBSTR({column}, 1, ?) = ?")
                params += [len(value), value]
        return await self._read(
            f"SELECT seq, at, actor, action, subject, data, hash FROM audit"
            f" WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*params, max(1, min(limit, 500))),
        )


def ui_store(store: base.Store) -> UiStore:
    """``store`` as the web UI's store, or a `ConfigurationError`."""
    if not isinstance(store, UiStore):
        raise errors.ConfigurationError(
            f"The store {type(store).__name__} keeps no sign-in sessions: the web UI needs a "
            "SQL store (SQLite or PostgreSQL)."
        )
    return store


def ui_tx(tx: base.Tx) -> UiTx:
    if not isinstance(tx, UiTx):
        raise errors.ConfigurationError(
            f"The store's transaction {type(tx).__name__} keeps no sign-in sessions."
        )
    return tx
