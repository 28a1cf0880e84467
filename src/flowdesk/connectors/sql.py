"""SQL databases (SQLAlchemy Core 2): PostgreSQL, MariaDB/MySQL and SQLite.

::

    ledger = SqlConnector("ledger", app, "postgresql://app@db.internal/ledger",
                          password=secrets.get("ledger.password"))
    save = upsert("save_invoice", "invoices", InvoiceRow)
    totals = statement("totals", "SELECT customer, SUM(amount) AS total FROM invoices"
                       " WHERE customer = :customer GROUP BY customer", CustomerRef)

    @app.step
    async def book(row: InvoiceRow) -> UpsertResult:
        return await ledger.call(save, row)

**Upserts keyed by the idempotency key.** The target table has a column (default
``idempotency_key``) with a UNIQUE constraint or unique index of its own (or is its primary
key); `upsert` writes the row with the run's key in it: ``INSERT ... ON CONFLICT (key) DO
UPDATE`` on PostgreSQL and SQLite, ``INSERT ... ON DUPLICATE KEY UPDATE`` on MariaDB/MySQL.
A step that runs again after a crash writes the same row again: one row per key, never two.
``on_conflict="ignore"`` keeps the first write's values instead. On MariaDB/MySQL, ON
DUPLICATE KEY reacts to *any* unique key of the table, so give the target table no other
unique key that a repeat could hit with different values. The result says whether this
call inserted the row (``inserted``) or found it there.

**Statements** (`statement`) are SQL text fixed in code, with named parameters from the
input model and ``:idempotency_key``; they are the caller's to make idempotent.

**Drivers.** PostgreSQL runs on psycopg 3 through SQLAlchemy's asyncio engine; MariaDB/MySQL
(PyMySQL) and SQLite (the standard library) run a synchronous engine in a worker thread.
Statements run with bound parameters only, and SQLAlchemy is told to keep parameters out
of its error messages (``hide_parameters``), so payload data does not end up in the step's
recorded error. Per-attempt timeouts are enforced by the connector and, where the driver
can, by the database too (PostgreSQL ``statement_timeout``; MySQL read/write timeouts;
SQLite's busy timeout). A statement the connector stopped waiting for may still commit:
the upsert key is what makes the retry harmless.

**Credentials.** The password comes from ``password=`` (a `Secret`) or with the whole URL
as a `Secret`; a plain-text URL that holds a password is refused. Targets in the audit
record and logs are the URL without user, password and query, then ``#table``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pydantic
import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from flowdesk import errors
from flowdesk.connectors import base
from flowdesk.connectors.secrets import Secret

if TYPE_CHECKING:
    from flowdesk.engine.app import App

I = TypeVar("I", bound=pydantic.BaseModel)  # noqa: E741
T = TypeVar("T")

_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "sqlite": "sqlite",
}
_ASYNC_DRIVERS = frozenset({"postgresql+psycopg", "postgresql+asyncpg", "sqlite+aiosqlite"})

__all__ = [
    "SqlConnector",
    "SqlResult",
    "StatementSpec",
    "UpsertResult",
    "UpsertSpec",
    "statement",
    "upsert",
]


# PostgreSQL SQLSTATEs worth a retry: connection errors (class 08), insufficient resources
# (53), serialization failure, deadlock, lock not available, query cancelled (the statement
# timeout), server shutting down.
_PG_TRANSIENT = frozenset({"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03"})
# MariaDB/MySQL: too many connections, lock wait timeout, deadlock, cannot connect, server
# gone away, lost connection.
_MYSQL_TRANSIENT = frozenset({1040, 1205, 1213, 2002, 2003, 2006, 2013})


def _transient(dialect: str, exc: sa_exc.DBAPIError, sqlstate: str | None, code: Any) -> bool:
    if dialect == "postgresql":
        if sqlstate is None:  # no server answer at all: the connection failed
            return isinstance(exc, sa_exc.OperationalError)
        return sqlstate[:2] in ("08", "53") or sqlstate in _PG_TRANSIENT
    if dialect in ("mysql", "mariadb"):
        return code in _MYSQL_TRANSIENT
    text = str(exc.orig).lower()
    return isinstance(exc, sa_exc.OperationalError) and ("locked" in text or "busy" in text)


# -- operations ------------------------------------------------------------------------------
class UpsertResult(pydantic.BaseModel):
    table: str
    idempotency_key: str
    inserted: bool
    """True when this call inserted the row; False when a row with the key was there."""


class SqlResult(pydantic.BaseModel):
    rowcount: int
    rows: list[dict[str, Any]] = []


@dataclass(frozen=True, slots=True)
class UpsertSpec:
    table: str
    on_conflict: Literal["update", "ignore"]


@dataclass(frozen=True, slots=True)
class StatementSpec:
    sql: str


def upsert(
    name: str,
    table: str,
    row: type[I],
    *,
    on_conflict: Literal["update", "ignore"] = "update",
    key_column: str = "idempotency_key",
    allow_fields: Sequence[str] = (),
) -> base.Operation[I, UpsertResult]:
    """Write one row of ``table`` (the fields of ``row``) keyed by the run's idempotency key.
    ``allow_fields``: columns named like credentials that are not (``token_count``)."""
    if on_conflict not in ("update", "ignore"):
        raise errors.ConfigurationError(f"operation {name!r}: on_conflict is update or ignore")
    if key_column in row.model_fields:
        raise errors.ConfigurationError(
            f"operation {name!r}: {row.__name__} has a field {key_column!r}; the connector "
            "fills that column with the run's idempotency key, so remove the field"
        )
    return base.Operation(
        name, row, UpsertResult, UpsertSpec(table, on_conflict), frozenset(allow_fields)
    )


def statement(
    name: str, sql: str, input: type[I], *, allow_fields: Sequence[str] = ()
) -> base.Operation[I, SqlResult]:
    """Run ``sql`` (fixed here, never from input) with the input's fields and
    ``:idempotency_key`` as named parameters; returns the rows it produced, if any."""
    return base.Operation(name, input, SqlResult, StatementSpec(sql), frozenset(allow_fields))


# -- the connector -----------------------------------------------------------------------------
class SqlConnector(base.Connector):
    """One database (see the module docstring)."""

    kind = "sql"

    def __init__(
        self,
        name: str,
        app: App,
        url: str | Secret,
        *,
        password: Secret | None = None,
        key_column: str = "idempotency_key",
        timeout: float = 30.0,
        retry: base.TransportRetry | None = None,
        rate: base.TokenBucket | None = None,
        pool_size: int = 5,
    ) -> None:
        super().__init__(name, app, timeout=timeout, retry=retry, rate=rate)
        text = url.reveal() if isinstance(url, Secret) else url
        try:
            parsed = make_url(text)
        except sa_exc.ArgumentError:
            raise errors.ConfigurationError(f"connector {name!r}: not a database URL") from None
        if parsed.password is not None and not isinstance(url, Secret):
            raise errors.ConfigurationError(
                f"connector {name!r}: the URL holds a password in plain text. Pass "
                "password=secrets.get(...), or the whole URL as a Secret."
            )
        if password is not None:
            parsed = parsed.set(password=password.reveal())
        driver = _DRIVERS.get(parsed.drivername, parsed.drivername)
        self.url: URL = parsed.set(drivername=driver)
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("postgresql", "mysql", "mariadb", "sqlite"):
            raise errors.ConfigurationError(
                f"connector {name!r}: {self.dialect} is not supported (PostgreSQL, "
                "MariaDB/MySQL and SQLite are)"
            )
        self._secrets: list[Secret] = []
        if self.url.password is not None:
            self._secrets.append(Secret(str(self.url.password), f"{name}#password"))
        if isinstance(url, Secret):
            self._secrets.append(url)
        self.key_column = key_column
        self.is_async = driver in _ASYNC_DRIVERS
        self.pool_size = pool_size
        self._engine: Engine | None = None
        self._async_engine: AsyncEngine | None = None
        self._tables: dict[str, sqlalchemy.Table] = {}
        self._where = URL.create(
            driver, host=self.url.host, port=self.url.port, database=self.url.database
        ).render_as_string(hide_password=True)

    def secrets(self) -> Sequence[Secret]:
        return self._secrets

    def target(self, op: base.Operation[Any, Any], data: pydantic.BaseModel) -> str:
        spec = op.spec
        return f"{self._where}#{spec.table}" if isinstance(spec, UpsertSpec) else self._where

    # -- engines ---------------------------------------------------------------------------------
    def _connect_args(self) -> dict[str, Any]:
        seconds = max(1, int(self.timeout + 0.999))
        if self.dialect == "postgresql":
            return {
                "connect_timeout": seconds,
                "options": f"-c statement_timeout={int(self.timeout * 1000)}",
            }
        if self.dialect in ("mysql", "mariadb"):
            return {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
        return {"timeout": self.timeout}

    def _engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "hide_parameters": True,
            "pool_pre_ping": True,
            "connect_args": self._connect_args(),
        }
        if self.dialect != "sqlite":
            kwargs.update(pool_size=self.pool_size, max_overflow=self.pool_size)
        return kwargs

    async def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction: on the asyncio engine, or in a thread."""
        if self.is_async:
            if self._async_engine is None:
                self._async_engine = create_async_engine(self.url, **self._engine_kwargs())
            async with self._async_engine.begin() as conn:
                return await conn.run_sync(fn)
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, **self._engine_kwargs())
        engine = self._engine

        def in_thread() -> T:
            with engine.begin() as conn:
                return fn(conn)

        return await asyncio.to_thread(in_thread)

    async def aclose(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()
            self._async_engine = None
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.dispose)
        self._tables.clear()

    # -- one attempt -----------------------------------------------------------------------------
    async def _perform(
        self, op: base.Operation[Any, Any], data: Any, call: base.Call
    ) -> base.Outcome:
        spec = op.spec
        fn: Callable[[Connection], Any]
        if isinstance(spec, UpsertSpec):
            values = data.model_dump(mode="python")
            fn = functools.partial(self._upsert, spec, values, call.idempotency_key, op.name)
        elif isinstance(spec, StatementSpec):
            params = {**data.model_dump(mode="python"), "idempotency_key": call.idempotency_key}
            fn = functools.partial(self._statement, spec, params)
        else:
            raise errors.ConfigurationError(
                f"operation {op.name!r} is not a SQL operation: build it with upsert() or "
                "statement()"
            )
        try:
            value = await self._run(fn)
        except sa_exc.NoSuchTableError as exc:
            raise errors.ConnectorRejected(
                f"connector {self.name!r}, operation {op.name!r}: no table {str(exc)!r} in "
                f"{self._where}",
                connector=self.name,
                operation=op.name,
            ) from None
        except sa_exc.DBAPIError as exc:
            raise self._translate(exc, op.name) from None
        detail = "inserted" if value.get("inserted") else "ok"
        if "rowcount" in value:
            detail = f"rowcount {value['rowcount']}"
        elif value.get("inserted") is False:
            detail = "existing row"
        return base.Outcome(value, detail)

    def _translate(self, exc: sa_exc.DBAPIError, op: str) -> Exception:
        """A driver error as a connector error: lost or refused connections, timeouts,
        deadlocks, serialization failures and locks are transient (`base.Transient`);
        constraint violations and SQL errors are not (`ConnectorRejected`). The message names
        the driver's error class and code, not the values."""
        orig = exc.orig
        kind = type(orig).__name__ if orig is not None else type(exc).__name__
        sqlstate = getattr(orig, "sqlstate", None)
        first = orig.args[0] if orig is not None and orig.args else None
        code: Any = sqlstate or (first if isinstance(first, int) else None)
        label = kind + (f" ({code})" if code is not None else "")
        if exc.connection_invalidated or _transient(self.dialect, exc, sqlstate, code):
            return base.Transient(f"database: {label}", maybe_done=True)
        if isinstance(exc, sa_exc.IntegrityError) or str(sqlstate or "").startswith("23"):
            what = "a constraint of the target refused the row"
        else:
            what = "the database refused the statement"
        detail = self.scrub(str(orig).strip().splitlines()[0])[:200] if orig is not None else ""
        return errors.ConnectorRejected(
            f"connector {self.name!r}, operation {op!r} on {self._where}: {what}: {label}"
            + (f": {detail}" if detail else ""),
            connector=self.name,
            operation=op,
        )

    def _table(self, conn: Connection, name: str) -> sqlalchemy.Table:
        table = self._tables.get(name)
        if table is not None:
            return table
        table = sqlalchemy.Table(name, sqlalchemy.MetaData(), autoload_with=conn)
        key = self.key_column
        if key not in table.c:
            raise errors.ConfigurationError(
                f"connector {self.name!r}: table {name!r} has no column {key!r} for the "
                "idempotency key"
            )
        if not self._unique(conn, name, key):
            raise errors.ConfigurationError(
                f"connector {self.name!r}: column {name}.{key} needs a UNIQUE constraint of "
                f"its own (ALTER TABLE {name} ADD UNIQUE ({key})): without it a repeated "
                "step would write a second row"
            )
        self._tables[name] = table
        return table

    def _unique(self, conn: Connection, table: str, key: str) -> bool:
        """Is ``key`` alone the primary key, or under a UNIQUE constraint or index?"""
        inspector = sqlalchemy.inspect(conn)
        if inspector.get_pk_constraint(table).get("constrained_columns") == [key]:
            return True
        if any(u["column_names"] == [key] for u in inspector.get_unique_constraints(table)):
            return True
        if any(i["unique"] and i["column_names"] == [key] for i in inspector.get_indexes(table)):
            return True
        if self.dialect == "sqlite":  # a column's own UNIQUE makes an index SQLAlchemy skips
            quoted = table.replace('"', '""')
            for index in conn.exec_driver_sql(f'PRAGMA index_list("{quoted}")').all():
                if not index[2]:  # (seq, name, unique, origin, partial)
                    continue
                index_name = str(index[1]).replace('"', '""')
                cols = conn.exec_driver_sql(f'PRAGMA index_info("{index_name}")').all()
                if [c[2] for c in cols] == [key]:
                    return True
        return False

    def _upsert(
        self, spec: UpsertSpec, values: dict[str, Any], key: str, op: str, conn: Connection
    ) -> dict[str, Any]:
        table = self._table(conn, spec.table)
        unknown = sorted(set(values) - set(table.c.keys()))
        if unknown:
            raise errors.ConnectorRejected(
                f"connector {self.name!r}, operation {op!r}: table {spec.table!r} has no "
                f"columns {unknown}",
                connector=self.name,
                operation=op,
            )
        key_col = table.c[self.key_column]
        existed = conn.execute(sqlalchemy.select(key_col).where(key_col == key)).first()
        row = {**values, self.key_column: key}
        update = spec.on_conflict == "update" and bool(values)
        stmt: Any
        if self.dialect in ("postgresql", "sqlite"):
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                stmt = pg_insert(table).values(row)
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                stmt = sqlite_insert(table).values(row)
            if update:
                stmt = stmt.on_conflict_do_update(
                    index_elements=[key_col], set_={c: stmt.excluded[c] for c in values}
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=[key_col])
        else:
            from sqlalchemy.dialects.mysql import insert as mysql_insert

            stmt = mysql_insert(table).values(row)
            if update:
                stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in values})
            else:  # a no-op update: the first write's values stay
                stmt = stmt.on_duplicate_key_update({self.key_column: key_col})
        conn.execute(stmt)
        return {"table": spec.table, "idempotency_key": key, "inserted": existed is None}

    def _statement(
        self, spec: StatementSpec, params: dict[str, Any], conn: Connection
    ) -> dict[str, Any]:
        result = conn.execute(sqlalchemy.text(spec.sql), params)
        rows = [dict(r._mapping) for r in result] if result.returns_rows else []
        return {"rowcount": result.rowcount if result.rowcount >= 0 else len(rows), "rows": rows}
