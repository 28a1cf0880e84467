"""The SQL connector against real databases: PostgreSQL (127.0.0.1:5432), MariaDB
(127.0.0.1:3306, root without password) and SQLite. Each test creates its own database
(``flowdesk_conn_<hex>``) and drops it afterwards; a server that does not answer fails the
test (it is never skipped: .ci/run starts both servers).

The flowdesk store of these tests is a SQLite file, except where ``app`` (both stores) is
used: the connector writes its audit records there.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydantic
import pymysql
import pytest
import sqlalchemy

import flowdesk
from flowdesk import errors
from flowdesk.connectors import base, sql
from flowdesk.connectors.secrets import Secret

POSTGRES = os.environ.get("FLOWDESK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
MARIADB_HOST = os.environ.get("FLOWDESK_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("FLOWDESK_TEST_MARIADB_PORT", "3306"))
TARGETS = ("sqlite", "postgres", "mariadb")


# -- target databases ---------------------------------------------------------------------------
def _create_postgres(name: str) -> str:
    try:
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES} does not answer ({exc}); start it (.ci/run)")
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def _drop_postgres(name: str) -> None:
    with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _mariadb() -> pymysql.connections.Connection[Any]:
    try:
        return pymysql.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", connect_timeout=5
        )
    except pymysql.err.OperationalError as exc:
        pytest.fail(
            f"MariaDB at {MARIADB_HOST}:{MARIADB_PORT} does not answer ({exc}); start it "
            "(.ci/run does: start-stop-daemon --start --exec /usr/sbin/mariadbd)"
        )


def _create_mariadb(name: str) -> str:
    conn = _mariadb()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        conn.close()
    return f"mysql+pymysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"


def _drop_mariadb(name: str) -> None:
    conn = _mariadb()
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


INVOICES = """
CREATE TABLE invoices (
    id              INTEGER PRIMARY KEY {autoinc},
    idempotency_key VARCHAR(200) NOT NULL UNIQUE,
    customer        VARCHAR(100) NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount >= 0),
    note            VARCHAR(200)
)
"""
NO_UNIQUE = "CREATE TABLE loose (id INTEGER PRIMARY KEY, idempotency_key VARCHAR(200))"


@pytest.fixture(params=TARGETS)
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database with the ``invoices`` table, on each kind of server."""
    kind: str = request.param
    name = f"flowdesk_conn_{pysecrets.token_hex(6)}"
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'target.db'}"
        autoinc = "AUTOINCREMENT"
    elif kind == "postgres":
        url = _create_postgres(name)
        autoinc = "GENERATED ALWAYS AS IDENTITY"
    else:
        url = _create_mariadb(name)
        autoinc = "AUTO_INCREMENT"
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(INVOICES.format(autoinc=autoinc)))
            conn.execute(sqlalchemy.text(NO_UNIQUE))
        yield url
    finally:
        engine.dispose()
        if kind == "postgres":
            _drop_postgres(name)
        elif kind == "mariadb":
            _drop_mariadb(name)


SELECT_ALL = "SELECT idempotency_key, customer, amount, note FROM invoices"


def rows(url: str, text: str = SELECT_ALL) -> list[tuple[Any, ...]]:
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(text + " ORDER BY 1"))]
    finally:
        engine.dispose()


@pytest.fixture
def local_app(tmp_path: Path) -> flowdesk.App:
    return flowdesk.App(f"sqlite:///{tmp_path / 'flowdesk.db'}", poll_interval=0.05)


class InvoiceRow(pydantic.BaseModel):
    customer: str
    amount: int
    note: str | None = None


class CustomerRef(pydantic.BaseModel):
    customer: str


SAVE = sql.upsert("save_invoice", "invoices", InvoiceRow)
SAVE_FIRST = sql.upsert("save_invoice_first", "invoices", InvoiceRow, on_conflict="ignore")
TOTALS = sql.statement(
    "totals",
    "SELECT customer, SUM(amount) AS total, COUNT(*) AS n FROM invoices"
    " WHERE customer = :customer GROUP BY customer",
    CustomerRef,
)
FAST_RETRY = base.TransportRetry(retries=1, delay=0.01)


async def audit_records(app: flowdesk.App, name: str = "ledger") -> list[dict[str, Any]]:
    async with flowdesk.App(app.database_url) as reader:
        found = await reader.store.audit_rows(0, 1000, f"connector:{name}")
    return [json.loads(r[5]) for r in found if r[3] == base.AUDIT_ACTION]


# -- upserts keyed by the run's idempotency key ----------------------------------------------
async def test_a_repeated_step_writes_one_row(local_app: flowdesk.App, target_url: str) -> None:
    app = local_app
    ledger = sql.SqlConnector("ledger", app, target_url, retry=FAST_RETRY)
    seen: list[bool] = []

    @app.step(retries=2, retry_delay=0.01)
    async def book(row: InvoiceRow) -> sql.UpsertResult:
        result = await ledger.call(SAVE, row)
        seen.append(result.inserted)
        info = flowdesk.current_step()
        if info is not None and info.attempt == 1:
            raise RuntimeError("the step fails after the row was written")
        return result

    @app.workflow("booking")
    async def booking(ctx: flowdesk.Context, customer: str, amount: int) -> sql.UpsertResult:
        return await ctx.step(book, InvoiceRow(customer=customer, amount=amount))

    async with app, app.worker(), ledger:
        handle = await app.start("booking", {"customer": "acme", "amount": 70})
        result = await handle.result(timeout=60)
        records = await audit_records(app)
    key = f"{handle.id}:1"
    assert result == sql.UpsertResult(table="invoices", idempotency_key=key, inserted=False)
    assert seen == [True, False]  # the second attempt found the row the first one wrote
    assert rows(target_url) == [(key, "acme", 70, None)]
    assert [(r["status"], r["detail"], r["idempotency_key"]) for r in records] == [
        ("ok", "inserted", key),
        ("ok", "existing row", key),
    ]
    assert records[0]["target"].endswith("#invoices")


async def test_update_or_ignore_on_conflict(local_app: flowdesk.App, target_url: str) -> None:
    async with local_app, sql.SqlConnector("ledger", local_app, target_url) as ledger:
        first = await ledger.call(SAVE, {"customer": "a", "amount": 1}, idempotency_key="k-1")
        second = await ledger.call(
            SAVE, {"customer": "a", "amount": 2, "note": "fixed"}, idempotency_key="k-1"
        )
        kept = await ledger.call(SAVE_FIRST, {"customer": "b", "amount": 3}, idempotency_key="k-2")
        again = await ledger.call(SAVE_FIRST, {"customer": "b", "amount": 4}, idempotency_key="k-2")
        totals = await ledger.call(TOTALS, {"customer": "a"}, idempotency_key="read-1")
    assert (first.inserted, second.inserted, kept.inserted, again.inserted) == (
        True,
        False,
        True,
        False,
    )
    assert rows(target_url) == [("k-1", "a", 2, "fixed"), ("k-2", "b", 3, None)]
    assert totals.rowcount == 1
    assert [(r["customer"], int(r["total"]), int(r["n"])) for r in totals.rows] == [("a", 2, 1)]


async def test_statements_get_the_idempotency_key(local_app: flowdesk.App, target_url: str) -> None:
    insert = sql.statement(
        "insert_plain",
        "INSERT INTO invoices (idempotency_key, customer, amount) VALUES"
        " (:idempotency_key, :customer, 5)",
        CustomerRef,
    )
    async with local_app, sql.SqlConnector("ledger", local_app, target_url) as ledger:
        done = await ledger.call(insert, {"customer": "s"}, idempotency_key="stmt-1")
        # The statement is the caller's to make idempotent: a plain INSERT repeated with the
        # same key hits the UNIQUE constraint, a permanent refusal.
        with pytest.raises(errors.ConnectorRejected, match="constraint"):
            await ledger.call(insert, {"customer": "s"}, idempotency_key="stmt-1")
    assert done.rowcount == 1
    assert rows(target_url) == [("stmt-1", "s", 5, None)]


# -- refusals and misconfiguration ---------------------------------------------------------------
async def test_a_violated_constraint_is_permanent(local_app: flowdesk.App, target_url: str) -> None:
    async with local_app, sql.SqlConnector("ledger", local_app, target_url) as ledger:
        with pytest.raises(errors.ConnectorRejected) as info:
            await ledger.call(SAVE, {"customer": "neg", "amount": -5}, idempotency_key="neg")
    assert isinstance(info.value, flowdesk.Permanent)
    assert "constraint" in str(info.value)
    assert rows(target_url) == []


async def test_a_key_column_without_unique_is_refused(
    local_app: flowdesk.App, target_url: str
) -> None:
    loose = sql.upsert("loose", "loose", CustomerRef)
    missing = sql.upsert("missing", "no_such_table", CustomerRef)
    async with local_app, sql.SqlConnector("ledger", local_app, target_url) as ledger:
        with pytest.raises(errors.ConfigurationError, match="UNIQUE"):
            await ledger.call(loose, {"customer": "x"}, idempotency_key="l-1")
        with pytest.raises(errors.ConnectorRejected, match="no_such_table"):
            await ledger.call(missing, {"customer": "x"}, idempotency_key="l-2")
        with pytest.raises(errors.ConnectorRejected, match="no columns"):
            await ledger.call(
                sql.upsert("extra", "invoices", _Extra),
                _Extra(customer="x", amount=1, vip=True),
                idempotency_key="l-3",
            )


class _Extra(pydantic.BaseModel):
    customer: str
    amount: int
    vip: bool


def test_operation_and_url_rules(tmp_path: Path) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened

    class WithKey(pydantic.BaseModel):
        idempotency_key: str

    with pytest.raises(errors.ConfigurationError, match="remove the field"):
        sql.upsert("bad", "invoices", WithKey)
    with pytest.raises(errors.ConfigurationError, match="plain text"):
        sql.SqlConnector("ledger", app, "postgresql://app:hunter22@127.0.0.1/x")
    with pytest.raises(errors.ConfigurationError, match="not supported"):
        sql.SqlConnector("ledger", app, "oracle://127.0.0.1/x")


# -- credentials -----------------------------------------------------------------------------------
async def test_the_password_stays_out_of_audit_logs_and_errors(
    app: flowdesk.App, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL with trust auth accepts any password, so a real one can be sent and then
    looked for everywhere it must not be."""
    caplog.set_level(logging.DEBUG)
    name = f"flowdesk_conn_{pysecrets.token_hex(6)}"
    url = _create_postgres(name)
    password = "pg-" + pysecrets.token_hex(10)
    try:
        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(INVOICES.format(autoinc="GENERATED ALWAYS AS IDENTITY")))
        engine.dispose()
        ledger = sql.SqlConnector(
            "ledger", app, url, password=Secret(password, "ledger.password"), retry=FAST_RETRY
        )
        whole = sql.SqlConnector(
            "ledger2", app, Secret(url.replace("postgres@", f"postgres:{password}@"), "url")
        )
        async with app, ledger, whole:
            await ledger.call(SAVE, {"customer": "p", "amount": 1}, idempotency_key="p-1")
            await whole.call(SAVE, {"customer": "q", "amount": 2}, idempotency_key="p-2")
            with pytest.raises(errors.ConnectorRejected) as info:
                await ledger.call(SAVE, {"customer": "p", "amount": -1}, idempotency_key="p-3")
            with pytest.raises(errors.ConnectorInputRefused):
                await ledger.call(SAVE, {"customer": password, "amount": 1}, idempotency_key="p-4")
            records = await audit_records(app) + await audit_records(app, "ledger2")
        assert [r["status"] for r in records] == ["ok", "error", "refused", "ok"]
        assert records[0]["target"] == f"postgresql+psycopg://127.0.0.1:5432/{name}#invoices"
        everything = json.dumps(records) + str(info.value) + caplog.text
        assert password not in everything
    finally:
        _drop_postgres(name)


async def test_an_unreachable_database_is_unavailable(local_app: flowdesk.App) -> None:
    ledger = sql.SqlConnector(
        "ledger", local_app, "postgresql://postgres@127.0.0.1:1/none", timeout=5, retry=FAST_RETRY
    )
    async with local_app, ledger:
        with pytest.raises(errors.ConnectorUnavailable) as info:
            await ledger.call(SAVE, {"customer": "u", "amount": 1}, idempotency_key="u-1")
        (record,) = await audit_records(local_app)
    assert "after 2 attempt(s)" in str(info.value)
    assert record["attempts"] == 2 and record["status"] == "error"
