"""The scale-out store: PostgreSQL through psycopg 3 and a connection pool.

Every API server and every worker on every machine points at the same database; there is
no coordinator of flowdesk's own. Workers claim with ``FOR UPDATE SKIP LOCKED`` so they
never wait on each other's rows; a worker's writes lock the run row and check its lease
(fencing); claims of a limited queue serialize on an advisory lock so its counts hold.
Every transition that makes work due sends ``NOTIFY flowdesk_work`` inside its transaction,
and idle workers that ``LISTEN`` wake at once; polling remains the fallback.

URL: ``postgresql://user@host:port/dbname`` (``postgres://`` and ``postgresql+psycopg://``
are accepted), with an optional ``?pool_size=N`` (default 10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

log = logging.getLogger("flowdesk.store.postgres")

T = TypeVar("T")
CHANNEL = "flowdesk_work"
_RETRYABLE = ("40001", "40P01")  # serialization failure, deadlock detected


class PostgresDialect(sql.Dialect):
    name = "postgresql"
    share = " FOR SHARE"
    update = " FOR UPDATE"
    skip = " FOR UPDATE SKIP LOCKED"

    @classmethod
    def translate(cls, text: str) -> str:
        return text.replace(sql.IN_LIST, " = ANY(?)").replace("?", "%s")

    @staticmethod
    def list_param(values: Sequence[str]) -> Any:
        return list(values)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The libpq URL for psycopg, and flowdesk's own options taken out of its query."""
    parts = urlsplit(url)
    scheme = "postgresql"
    query = dict(parse_qsl(parts.query))
    options = {k: query.pop(k) for k in list(query) if k in ("pool_size",)}
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), "")), options


def _redact(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.split("@", 1)[0]:
        user = netloc.split("@", 1)[0].split(":", 1)[0]
        netloc = f"{user}:***@{netloc.split('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Tx(
    sql_models.ModelsTx,
    sql_observe.ObserveTx,
    sql_ui.UiTx,
    sql_people.PeopleTx,
    sql_privacy.PrivacyTx,
):
    dialect = PostgresDialect

    def __init__(self, conn: psycopg.AsyncConnection[Any], now: int) -> None:
        super().__init__(now)
        self.c = conn
        self._notified: set[str] = set()

    async def _one(self, text: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        cur = await self.c.execute(self.dialect.prepare(text), params)
        return await cur.fetchone()

    async def _all(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        cur = await self.c.execute(self.dialect.prepare(text), params)
        return await cur.fetchall()

    async def _run(self, text: str, params: Sequence[Any] = ()) -> int:
        cur = await self.c.execute(self.dialect.prepare(text), params)
        return cur.rowcount

    async def _many(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.c.cursor() as cur:
            await cur.executemany(self.dialect.prepare(text), rows)

    async def _append_audit(self, rows: list[tuple[Any, ...]]) -> None:
        # One round trip for any number of records: the rows travel as arrays.
        cols = list(zip(*rows, strict=True))
        await self.c.execute(
            "WITH appended AS (INSERT INTO audit (seq, at, actor, action, subject, data,"
            " data_hash, prev_hash, hash) SELECT * FROM unnest(%s::bigint[], %s::bigint[],"
            " %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::text[])) UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
            (*[list(c) for c in cols], rows[-1][0], rows[-1][8]),
        )

    async def _lock_queue(self, name: str) -> None:
        await self.c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("queue:" + name,))

    async def notify(self, queue: str) -> None:
        if queue not in self._notified:
            self._notified.add(queue)
            await self.c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, queue))


class PostgresStore(
    sql_models.ModelsStore,
    sql_observe.ObserveStore,
    sql_ui.UiStore,
    sql_people.PeopleStore,
    sql_privacy.PrivacyStore,
):
    dialect = PostgresDialect
    parallel_writes = 4  # group commits in flight at once, each on its own connection

    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo, options = split_url(url)
        self.label = _redact(self.conninfo)
        self.pool_size = int(options.get("pool_size", 10))
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None

    # -- connection ------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - the extra is part of the install
            raise errors.ConfigurationError(
                "PostgreSQL needs psycopg: pip install 'flowdesk[postgres]'"
            ) from exc
        # One plain connection first: it fails fast with the server's own words, and
        # creates or upgrades the schema before any pool connection is used.
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=10
            )
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise errors.StoreError(
                f"Cannot connect to PostgreSQL at {self.label}: {reason}"
            ) from exc
        try:
            async with conn:
                await migrations.migrate_postgres(conn, self.label)
        except psycopg.Error as exc:
            raise errors.StoreError(f"PostgreSQL at {self.label}: {exc}") from exc
        self._load_keys()
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            open=False,
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            name="flowdesk",
        )
        try:
            await pool.open(wait=True, timeout=10)
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            raise errors.StoreError(
                f"Cannot connect to PostgreSQL at {self.label}: no pool connection in 10 s."
            ) from exc
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        if self._pool is None:
            raise errors.StoreError("The store is not open: call `await app.open()` first.")
        return self._pool

    def _unavailable(self, exc: BaseException) -> errors.StoreError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return errors.StoreError(f"PostgreSQL at {self.label} is unavailable: {reason}")

    async def _read(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        import psycopg
        import psycopg_pool

        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(self.dialect.prepare(text), params)
                rows: list[Sequence[Any]] = await cur.fetchall()
                return rows
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            if exc.sqlstate in _RETRYABLE:  # a deadlock, not a lost server
                raise
            raise self._unavailable(exc) from exc

    @asynccontextmanager
    async def _txn(self) -> AsyncIterator[sql.SqlTx]:
        import psycopg
        import psycopg_pool

        try:
            async with self.pool.connection() as conn, conn.transaction():
                tx = _Tx(conn, base.now_ms())
                tx.keys = self.keys
                yield tx
                await tx.seal_audit()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            if exc.sqlstate in _RETRYABLE:  # a deadlock, not a lost server
                raise
            raise self._unavailable(exc) from exc

    async def _again_on_conflict(self, body: Callable[[], Awaitable[T]]) -> T:
        import psycopg

        for attempt in range(5):
            try:
                return await body()
            except psycopg.Error as exc:
                if exc.sqlstate not in _RETRYABLE or attempt == 4:
                    raise
                await asyncio.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- writes ----------------------------------------------------------------------
    async def transact(self, work: Sequence[Callable[[base.Tx], Awaitable[Any]]]) -> list[Any]:
        import psycopg
        import psycopg_pool

        for attempt in range(5):
            try:
                return await self._transact_once(work)
            except psycopg.Error as exc:
                # A deadlock or serialization failure rolled everything back: try again.
                # psycopg counts both as OperationalError, but the server is fine.
                if exc.sqlstate in _RETRYABLE:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.005 * (attempt + 1))
                    continue
                if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
                    raise self._unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")

    async def _transact_once(
        self, work: Sequence[Callable[[base.Tx], Awaitable[Any]]]
    ) -> list[Any]:
        import psycopg

        async with self.pool.connection() as conn:
            # Optimistically, without a savepoint per operation (each costs round trips):
            # operations are refused rarely, and a refusal rolls the batch back to redo it
            # below with savepoints.
            try:
                async with conn.transaction():
                    tx = _Tx(conn, base.now_ms())
                    tx.keys = self.keys
                    done = []
                    for op in work:
                        tx.actor = "system"
                        done.append(await op(tx))
                    await tx.seal_audit()
                    return done
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                if exc.sqlstate in _RETRYABLE:
                    raise
                if len(work) == 1:
                    return [exc]
            except Exception as exc:
                if len(work) == 1:
                    return [exc]
            results: list[Any] = []
            async with conn.transaction():
                tx = _Tx(conn, base.now_ms())
                tx.keys = self.keys
                for op in work:
                    tx.actor = "system"
                    mark = len(tx.events)
                    try:
                        async with conn.transaction():  # a savepoint per operation
                            results.append(await op(tx))
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error as exc:
                        if exc.sqlstate in _RETRYABLE:
                            raise
                        del tx.events[mark:]
                        results.append(exc)
                    except Exception as exc:  # one refused operation; keep the others
                        del tx.events[mark:]
                        results.append(exc)
                await tx.seal_audit()
            return results

    # -- notifications ---------------------------------------------------------------
    async def listen(self, on_notify: Callable[[str], None]) -> None:
        """Call ``on_notify(queue)`` for every notification, reconnecting on failure, until
        cancelled."""
        import psycopg

        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    on_notify("")  # anything may have become due while we were away
                    async for note in conn.notifies():
                        on_notify(note.payload)
            except psycopg.Error as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
