"""The embedded store: one SQLite file in WAL mode.

Writes take the database's single write lock with ``BEGIN IMMEDIATE`` and never upgrade a
read transaction, so SQLite cannot answer with a deadlock. The connection's busy timeout is
zero: when another process holds the lock, the store waits with ``asyncio.sleep`` (the
event loop keeps serving heartbeats) and tries again, for up to ``busy_seconds`` (60 by
default), so callers never see "database is locked" under load.

SQLite statements never suspend, so when the lock is free a batch of writes commits inside
the caller's turn of the event loop (`SQLiteStore.transact_now`).

URL: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, with options
``?synchronous=full|normal`` (default ``full``: a commit survives power loss; ``normal``
survives a crashed process but may lose the last commits on power loss).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flowdesk import errors
from flowdesk.store import (
    base,
    migrations,
    sql,
    sql_models,
    sql_observe,
    sql_people,
    sql_privacy,
    sql_ui,
)

__all__ = ["SQLiteStore", "parse_url"]


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


class _Tx(
    sql_models.ModelsTx,
    sql_observe.ObserveTx,
    sql_ui.UiTx,
    sql_people.PeopleTx,
    sql_privacy.PrivacyTx,
):
    def __init__(self, conn: sqlite3.Connection, now: int) -> None:
        super().__init__(now)
        self.c = conn

    async def _one(self, text: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self.c.execute(self.dialect.prepare(text), params).fetchone()
        return row

    async def _all(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return self.c.execute(self.dialect.prepare(text), params).fetchall()

    async def _run(self, text: str, params: Sequence[Any] = ()) -> int:
        return self.c.execute(self.dialect.prepare(text), params).rowcount

    async def _many(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        self.c.executemany(self.dialect.prepare(text), rows)


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


class SQLiteStore(
    sql_models.ModelsStore,
    sql_observe.ObserveStore,
    sql_ui.UiStore,
    sql_people.PeopleStore,
    sql_privacy.PrivacyStore,
):
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
        try:  # once the file is known to be flowdesk's: no key file beside anyone else's
            self._load_keys()
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

    @asynccontextmanager
    async def _txn(self) -> AsyncIterator[sql.SqlTx]:
        async with self._lock:
            conn = self.conn
            await self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                tx = _Tx(conn, base.now_ms())
                tx.keys = self.keys
                yield tx
                _drive(tx.seal_audit())
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def _read(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        conn = self.conn
        prepared = self.dialect.prepare(text)
        rows: list[Sequence[Any]] = await self._retry(
            lambda: conn.execute(prepared, params).fetchall()
        )
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
        tx = _Tx(conn, base.now_ms())
        tx.keys = self.keys
        results: list[Any] = []
        single = len(work) == 1
        try:
            for op in work:
                if not single:
                    conn.execute("SAVEPOINT op")
                tx.actor = "system"
                mark = len(tx.events)
                try:
                    results.append(_drive(op(tx)))
                except sqlite3.OperationalError:
                    raise
                except Exception as exc:  # one refused operation; keep the others
                    if single:
                        conn.execute("ROLLBACK")
                        return [exc]
                    conn.execute("ROLLBACK TO op")
                    del tx.events[mark:]
                    results.append(exc)
                if not single:
                    conn.execute("RELEASE op")
            _drive(tx.seal_audit())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results
