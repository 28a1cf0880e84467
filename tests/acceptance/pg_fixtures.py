"""Fixtures for the PostgreSQL acceptance tests: real `flowdesk` processes on a real
PostgreSQL database.

Each test gets a database of its own, ``flowdesk_test_<hex>``, created (autocommit,
through the ``postgres`` database of the server named by ``$FLOWDESK_TEST_POSTGRES``,
default ``postgresql://postgres@127.0.0.1:5432/postgres``) before the test and dropped
with ``DROP DATABASE ... WITH (FORCE)`` after its processes are stopped. A server that
cannot be reached fails the test; it is never skipped.

`PgFlow` is the `conftest.Flow` of these tests: the same process tracking (`Procs`), the
same SQLite side database the steps write their effects to (it lives outside PostgreSQL,
so it survives a restart of the server), with `rows` reading the PostgreSQL database.
Import the fixture into a test module with ``from .pg_fixtures import pg_flow``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql as pgsql

from . import pgapp
from .conftest import Flow, Proc, Procs, poll_until

ADMIN_URL = os.environ.get(
    "FLOWDESK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_ADMIN = urlsplit(ADMIN_URL)
PG_HOST = _ADMIN.hostname or "127.0.0.1"
PG_PORT = _ADMIN.port or 5432


def database_url(name: str) -> str:
    """The URL of database ``name`` on the admin URL's server."""
    return urlunsplit((_ADMIN.scheme, _ADMIN.netloc, "/" + name, "", ""))


def admin_connect() -> psycopg.Connection[Any]:
    """An autocommit connection to the server's ``postgres`` database; fails the test
    (never skips it) when the server cannot be reached."""
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(f"cannot connect to PostgreSQL at {ADMIN_URL}: {exc}")


def pg_isready(timeout: float = 2.0) -> bool:
    """Whether ``pg_isready`` says the server accepts connections."""
    try:
        done = subprocess.run(
            ["pg_isready", "-h", PG_HOST, "-p", str(PG_PORT), "-t", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait_pg_ready(timeout: float = 60.0) -> float:
    """Wait until ``pg_isready`` answers; returns the seconds waited."""
    t0 = time.monotonic()
    while not pg_isready():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"PostgreSQL at {PG_HOST}:{PG_PORT} not ready after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def restart_postgres(timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Restart the local PostgreSQL cluster the way an operator would."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if len(versions) != 1:
        pytest.fail(f"expected one PostgreSQL version under /etc/postgresql, found {versions}")
    args = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "restart"]
    done = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def create_database() -> str:
    name = f"flowdesk_test_{secrets.token_hex(6)}"
    with admin_connect() as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    return name


def drop_database(name: str) -> None:
    """Drop the test database, waiting for the server if a test left it restarting."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(name)
                    )
                )
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class PgFlow(Flow):
    """One test's world on PostgreSQL: its own database, the side database (SQLite) the
    steps write to, and the processes working on them."""

    def __init__(self, root: Path, procs: Procs, dbname: str) -> None:
        super().__init__(root, procs)
        self.dbname = dbname
        self.url = database_url(dbname)
        self.env["FLOWDESK_DATABASE_URL"] = self.url
        pgapp.init_side_db(str(self.side_db))

    # -- processes -------------------------------------------------------------------
    def worker(  # type: ignore[override]
        self,
        *,
        app: str = pgapp.APP,
        lease: float = 1.5,
        poll: float = 0.1,
        concurrency: int | None = None,
        name: str = "worker",
        ready: bool = True,
    ) -> Proc:
        args = ["worker", "--app", app, "--database-url", self.url]
        args += ["--lease-seconds", str(lease), "--poll-interval", str(poll)]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        proc = self.spawn(*args, name=name)
        if ready:
            self.wait_ready(proc)
        return proc

    def start(self, workflow: str, payload: Any, *extra: str, app: str = pgapp.APP) -> str:
        """``flowdesk start`` through the CLI; returns the new run's id."""
        out = self.cli_json("start", workflow, "--app", app, "--input", json.dumps(payload), *extra)
        assert out["created"] is True, out
        return str(out["id"])

    def pgapp(self, *args: str, name: str) -> Proc:
        """``python -m pgapp ARGS`` in the background (see `pgapp.main`)."""
        return self.procs.spawn(
            (sys.executable, "-m", "pgapp", *args), env=self.env, cwd=self.root, name=name
        )

    def finish(self, proc: Proc, timeout: float = 60.0) -> str:
        """Wait for a short-lived process to exit 0; returns its stdout."""
        self.wait_until(lambda: not proc.alive(), timeout=timeout, what=f"{proc.name} to exit")
        assert self.stop(proc) == 0, proc.describe()
        return proc.stdout()

    # -- the database ----------------------------------------------------------------
    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read the flowdesk database (``?`` placeholders, as in `Flow.rows`)."""
        with self.connect() as conn:
            if not params:
                return list(conn.execute(sql).fetchall())
            return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())

    # -- waiting ---------------------------------------------------------------------
    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        watch: Sequence[Proc] = (),
        interval: float = 0.02,
    ) -> None:
        """Poll ``predicate`` until it is true; fail early when a watched process died.
        A database not reachable yet (no schema, a server restarting) counts as false."""
        poll_until(
            predicate,
            timeout=timeout,
            what=what,
            watch=watch,
            interval=interval,
            transient=(
                psycopg.OperationalError,
                psycopg.errors.UndefinedTable,
                sqlite3.OperationalError,
            ),
        )


@pytest.fixture
def pg_flow(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PgFlow]:
    root = tmp_path / "work"
    root.mkdir()
    name = create_database()
    try:
        made = PgFlow(root, procs, name)
        # Apps the test opens in its own process use the processes' master key file too.
        monkeypatch.setenv("FLOWDESK_MASTER_KEY_FILE", str(made.key_file))
        yield made
    finally:
        procs.stop_all()  # every process is gone before its database is
        drop_database(name)
