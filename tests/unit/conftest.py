"""Shared fixtures for the in-process unit tests.

Every test that uses the database (through ``db_url`` and what is built on it: ``app``,
``make_app``, ``query``, ``execute``, ``new_db_url``) runs twice, once per store:

* ``[sqlite]``: one SQLite file per test;
* ``[postgres]``: one database per test on the PostgreSQL server named by
  ``$FLOWDESK_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
  The session migrates a template database ``flowdesk_tpl_<hex>`` once; each test gets
  ``CREATE DATABASE flowdesk_test_<hex> TEMPLATE flowdesk_tpl_<hex>`` and drops it
  afterwards, and the session drops the template at its end. Random names keep parallel
  and repeated runs apart. When the server cannot be reached the PostgreSQL tests fail;
  they are never skipped.

A test about SQLite itself (its file, its WAL mode) is marked ``@pytest.mark.sqlite_only``
and runs on SQLite alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql as pgsql

import flowdesk

POLL = 0.05
STORES = ("sqlite", "postgres")
POSTGRES_URL = os.environ.get(
    "FLOWDESK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pytest_configure(config: pytest.Config) -> None:
    # Payload master keys: one key file for the session (a SQLite database would otherwise
    # get its own beside it, and PostgreSQL the user's ~/.config/flowdesk/master.key).
    os.environ.setdefault(
        "FLOWDESK_MASTER_KEY_FILE",
        os.path.join(tempfile.mkdtemp(prefix="flowdesk-keys-"), "master.key"),
    )
    config.addinivalue_line(
        "markers", "sqlite_only: the test is about SQLite itself; it does not run on PostgreSQL"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        kinds = ["sqlite"] if sqlite_only else list(STORES)
        metafunc.parametrize("store_kind", kinds, indirect=True, ids=kinds)


Predicate = Callable[[], Any | Awaitable[Any]]


async def _wait_until(
    predicate: Predicate, *, timeout: float = 15.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate!r}")
        await asyncio.sleep(interval)


async def _wait_status(
    app: flowdesk.App, run_id: str, status: flowdesk.RunStatus | str, timeout: float = 15.0
) -> flowdesk.Run:
    async def check() -> flowdesk.Run | None:
        run = await app.get_run(run_id)
        return run if run.status == status else None

    run: flowdesk.Run = await _wait_until(
        check, timeout=timeout, what=f"run {run_id} becomes {status}"
    )
    return run


# -- PostgreSQL: one template per session, one database per test ------------------------


def postgres_url(dbname: str, base: str = POSTGRES_URL) -> str:
    """``base`` (the server's URL) pointing at database ``dbname``."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _run_async(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine function to its end in a thread of its own (so it never meets the
    test's event loop) and return its value."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


READY_DATABASES = 4  # migrated copies kept ready, so a test does not wait for CREATE DATABASE


def _cannot_connect(url: str, exc: BaseException) -> None:
    pytest.fail(
        f"The PostgreSQL tests need a server at {_redacted(url)} and cannot connect to it: "
        f"{str(exc).strip()}\nStart PostgreSQL (.ci/run shows how) or point "
        "FLOWDESK_TEST_POSTGRES at one.",
        pytrace=False,
    )


class _Admin:
    """An autocommit connection to the server's admin database for CREATE and DROP
    DATABASE. Connection losses (a server restart) are retried for up to 30 s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        failure: psycopg.OperationalError | None = None
        try:
            self._conn = self._connect()
        except psycopg.OperationalError as exc:
            failure = exc
        if failure is not None:  # outside the handler: one message, not two tracebacks
            _cannot_connect(url, failure)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def execute(self, statement: pgsql.Composable) -> None:
        deadline = time.monotonic() + 30
        retried = False
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                self._conn.execute(statement)
                return
            except psycopg.errors.DuplicateDatabase:
                if not retried:
                    raise
                return  # the try that lost its connection had created it
            except psycopg.errors.ObjectInUse:
                # CREATE DATABASE ... TEMPLATE: the template's last session is going away.
                if time.monotonic() > deadline:
                    raise
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                retried = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            time.sleep(0.1)

    def create(self, prefix: str, template: str | None) -> str:
        """A new database (a copy of ``template``, or empty); returns its name."""
        name = f"{prefix}_{secrets.token_hex(8)}"
        self.execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pgsql.Identifier(name), pgsql.Identifier(template or "template0")
            )
        )
        return name

    def drop(self, name: str) -> None:
        self.execute(
            pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresServer:
    """The session's databases on the test server.

    ``start`` creates the template ``flowdesk_tpl_<hex>`` and migrates it. A helper thread
    keeps a few copies of it ready (``take`` hands one out) and drops the ones tests give
    back; ``close`` waits for it, then drops what is left and the template."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.template: str | None = None
        self._admin: _Admin | None = None
        self._cond = threading.Condition()
        self._ready: list[str] = []
        self._doomed: list[str] = []
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._admin = _Admin(self.url)
        self.template = self._admin.create("flowdesk_tpl", None)

        async def migrate() -> None:
            app = flowdesk.App(postgres_url(self.template or ""))
            await app.open()  # opening migrates
            await app.close()

        _run_async(migrate)
        self._thread = threading.Thread(
            target=self._keep_ready, args=(_Admin(self.url),), daemon=True
        )
        self._thread.start()

    def _keep_ready(self, admin: _Admin) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._doomed or self._stopping or len(self._ready) < READY_DATABASES
                    ):
                        self._cond.wait()
                    # A test may be waiting for a database: make one before dropping any.
                    make = not self._stopping and len(self._ready) < READY_DATABASES
                    doomed = self._doomed.pop(0) if self._doomed and not make else None
                    if not make and doomed is None:
                        return  # stopping, and nothing left to drop
                if doomed is not None:
                    admin.drop(doomed)
                    continue
                name = admin.create("flowdesk_test", self.template)
                with self._cond:
                    self._ready.append(name)
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            admin.close()

    def take(self) -> str:
        """The name of a new migrated database, the test's own."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._error, timeout=60):
                raise TimeoutError("no PostgreSQL test database was created within 60 s")
            if self._error is not None:
                raise RuntimeError("creating PostgreSQL test databases failed") from self._error
            self._cond.notify_all()  # make the next one
            return self._ready.pop(0)

    def create_empty(self) -> str:
        assert self._admin is not None
        return self._admin.create("flowdesk_test", None)

    def give_back(self, name: str) -> None:
        """Drop the database (soon, on the helper thread)."""
        with self._cond:
            if self._error is None:
                self._doomed.append(name)
                self._cond.notify_all()
                return
        assert self._admin is not None
        self._admin.drop(name)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(120)
        if self._admin is None:
            return
        try:
            for name in [*self._doomed, *self._ready]:
                self._admin.drop(name)
            if self.template is not None:
                self._admin.drop(self.template)
        finally:
            self._admin.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(POSTGRES_URL)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def new_postgres_db(postgres_server: PostgresServer) -> Iterator[Callable[..., str]]:
    """``new(migrated=True)``: the URL of a new database of this test, a copy of the
    migrated template (or empty with ``migrated=False``); all are dropped afterwards."""
    made: list[str] = []

    def new(*, migrated: bool = True) -> str:
        name = postgres_server.take() if migrated else postgres_server.create_empty()
        made.append(name)
        return postgres_url(name)

    yield new
    for name in made:
        postgres_server.give_back(name)


# -- the store under test ---------------------------------------------------------------


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: every test that uses the database runs on both."""
    kind: str = request.param
    return kind


@pytest.fixture
def db_path(store_kind: str, tmp_path: Path) -> Path:
    """The SQLite file of the test (SQLite only)."""
    if store_kind != "sqlite":
        pytest.fail(
            "db_path is the SQLite file; on PostgreSQL there is none. Read and write the "
            "database with the `query` and `execute` fixtures, or mark the test sqlite_only.",
            pytrace=False,
        )
    return tmp_path / "t.db"


@pytest.fixture
def db_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    """The test's own database: a new SQLite file, or a new migrated PostgreSQL database."""
    if store_kind == "sqlite":
        return f"sqlite:///{request.getfixturevalue('db_path')}"
    new: Callable[..., str] = request.getfixturevalue("new_postgres_db")
    return new()


@pytest.fixture
def new_db_url(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., str]:
    """Another new database of the test's store, on every call (``migrated=False``: an
    empty one)."""
    if store_kind == "postgres":
        new: Callable[..., str] = request.getfixturevalue("new_postgres_db")
        return new

    def new_file(*, migrated: bool = True) -> str:
        return f"sqlite:///{tmp_path}/extra-{secrets.token_hex(8)}.db"

    return new_file


@pytest.fixture
def app(db_url: str) -> flowdesk.App:
    """A fresh, unopened App on its own database."""
    return flowdesk.App(db_url, poll_interval=POLL)


@pytest.fixture
def make_app(db_url: str) -> Callable[..., flowdesk.App]:
    """More App objects on the same database (another process, in effect)."""

    def make(**kwargs: Any) -> flowdesk.App:
        kwargs.setdefault("poll_interval", POLL)
        return flowdesk.App(db_url, **kwargs)

    return make


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    return _wait_until


@pytest.fixture
def wait_status() -> Callable[..., Awaitable[flowdesk.Run]]:
    return _wait_status


class DirectSql:
    """Runs SQL on the test's database on a connection of its own, outside the engine.
    Statements use ``?`` placeholders on both stores (``%s`` on PostgreSQL)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.sqlite_path = db_url[len("sqlite:///") :] if db_url.startswith("sqlite:") else None
        self._pg: psycopg.Connection[Any] | None = None

    def _postgres(self) -> psycopg.Connection[Any]:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(self.db_url, autocommit=True, connect_timeout=5)
        return self._pg

    def run(self, text: str, params: tuple[Any, ...] | list[Any] = ()) -> tuple[list[Any], int]:
        """(rows, rowcount) of one statement, committed."""
        if self.sqlite_path is not None:
            conn = sqlite3.connect(self.sqlite_path)
            try:
                cur = conn.execute(text, tuple(params))
                rows = cur.fetchall()
                conn.commit()
                return rows, cur.rowcount
            finally:
                conn.close()
        cur = self._postgres().execute(
            text.replace("%", "%%").replace("?", "%s"),
            tuple(params),
        )
        return (cur.fetchall() if cur.description is not None else []), cur.rowcount

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()


@pytest.fixture
def direct_sql(db_url: str) -> Iterator[DirectSql]:
    direct = DirectSql(db_url)
    yield direct
    direct.close()


@pytest.fixture
def query(direct_sql: DirectSql) -> Callable[..., list[tuple[Any, ...]]]:
    """Read the database directly, on a connection of its own: ``query(sql, params)``
    returns the rows. ``?`` placeholders work on both stores."""

    def run(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return direct_sql.run(sql, params)[0]

    return run


@pytest.fixture
def execute(direct_sql: DirectSql) -> Callable[..., int]:
    """Change the database directly (committed at once): ``execute(sql, params)`` returns
    the number of rows changed. ``?`` placeholders work on both stores."""

    def run(sql: str, params: tuple[Any, ...] = ()) -> int:
        return direct_sql.run(sql, params)[1]

    return run


@pytest.fixture
def reveal(
    query: Callable[..., list[tuple[Any, ...]]], db_url: str
) -> Callable[[str, int, str, str | None], Any]:
    """Open a payload read raw from the database, as the store does (payloads are sealed
    at rest): ``reveal(run_id, seq, kind, stored)`` returns its decoded JSON; kinds are
    ``input``, ``output``, ``error``, ``step.output``, ``step.error``, ``signal:<name>``."""
    from flowdesk.store import payloads, sql_payloads

    masters = payloads.load_master_keys(db_url)
    ring = None if masters is None else payloads.Keyring(masters)
    pg = not db_url.startswith("sqlite")
    in_list = " IN (SELECT value FROM json_each(?))"

    async def fetch(sql: str, params: Any) -> list[Any]:
        return query(sql.replace(in_list, " = ANY(?)") if pg else sql, tuple(params))

    def as_list(values: Any) -> Any:
        return list(values) if pg else json.dumps(list(values))

    def open_(run_id: str, seq: int, kind: str, stored: str | None) -> Any:
        coro = sql_payloads.load(ring, fetch, as_list, [run_id])
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value.json(run_id, seq, kind, stored)
        raise AssertionError("loading keys suspended")

    return open_
