"""Schema migrations: numbered without gaps, the same steps on every store, applied once
even by concurrent openers."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import psycopg
import pytest

import flowdesk
from flowdesk.errors import StoreError
from flowdesk.store import migrations


def test_sqlite_migrations_are_numbered_without_gaps():
    found = migrations.load("sqlite")
    assert found, "no migrations shipped"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert migrations.latest("sqlite") == len(found)
    for m in found:
        assert m.name and m.sql.strip()
        assert migrations._statements(m.sql)
    assert found[0].name == "init"


def test_postgres_migrations_match_the_sqlite_ones_one_for_one():
    sqlite = migrations.load("sqlite")
    postgres = migrations.load("postgres")  # raises on a gap in the numbers
    assert postgres, "no migrations shipped"
    assert [m.version for m in postgres] == list(range(1, len(postgres) + 1))
    assert migrations.latest("postgres") == len(postgres) == migrations.latest("sqlite")
    assert [(m.version, m.name) for m in postgres] == [(m.version, m.name) for m in sqlite]
    for m in postgres:
        assert m.sql.strip() and migrations._statements(m.sql)


def test_a_gap_in_migration_numbers_is_an_error(tmp_path, monkeypatch):
    folder = tmp_path / "sql" / "fake"
    folder.mkdir(parents=True)
    (folder / "0001_first.sql").write_text("CREATE TABLE a (x INTEGER);\n")
    (folder / "0003_third.sql").write_text("CREATE TABLE c (x INTEGER);\n")
    (folder / "README.txt").write_text("not a migration")
    monkeypatch.setattr(migrations.resources, "files", lambda package: tmp_path)
    with pytest.raises(StoreError, match="gap") as info:
        migrations.load("fake")
    assert "0002" in str(info.value) and "0003_third.sql" in str(info.value)

    (folder / "0002_second.sql").write_text("CREATE TABLE b (x INTEGER);\n")
    assert [(m.version, m.name) for m in migrations.load("fake")] == [
        (1, "first"),
        (2, "second"),
        (3, "third"),
    ]


def _schema_version(url: str) -> int:
    """The version recorded in the database, read on a connection of its own."""
    sql = "SELECT value FROM flowdesk_meta WHERE key = 'schema_version'"
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


async def test_concurrent_openers_of_a_new_database_migrate_it_once(
    store_kind, new_db_url, monkeypatch
):
    url = new_db_url(migrated=False)  # a new file; on PostgreSQL an empty database
    dialect = store_kind  # the migrations of store/sql/<dialect>
    applied: list[int] = []
    lock = threading.Lock()
    original = migrations._statements

    def counting(sql: str) -> list[str]:
        with lock:
            applied.append(1)
        return original(sql)

    monkeypatch.setattr(migrations, "_statements", counting)

    openers = 4
    barrier = threading.Barrier(openers)
    failures: list[BaseException] = []

    async def open_and_close() -> None:
        app = flowdesk.App(url)
        barrier.wait(timeout=10)
        await app.open()
        await app.close()

    def in_thread() -> None:
        try:
            asyncio.run(open_and_close())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert len(applied) == migrations.latest(dialect)  # each migration applied once
    assert _schema_version(url) == migrations.latest(dialect)

    # Opening it again later applies nothing, and the database works.
    app = flowdesk.App(url, poll_interval=0.05)

    @app.workflow("hello")
    async def hello(ctx: flowdesk.Context, name: str) -> str:
        return f"hello {name}"

    async with app, app.worker(concurrency=2):
        h = await app.start("hello", {"name": "world"})
        assert await app.result(h.id, timeout=10) == "hello world"
    assert len(applied) == migrations.latest(dialect)


async def test_two_apps_in_one_loop_share_a_new_database(store_kind, new_db_url):
    url = new_db_url(migrated=False)
    a = flowdesk.App(url)
    b = flowdesk.App(url)
    await asyncio.gather(a.open(), b.open())
    try:
        assert await a.store.count_runs() == 0
        assert await b.store.count_runs() == 0
    finally:
        await asyncio.gather(a.close(), b.close())
    assert _schema_version(url) == migrations.latest(store_kind)
