"""Versioned schema migrations: ``store/sql/<dialect>/NNNN_name.sql``, applied in order.

The schema version lives in ``flowdesk_meta``. A database with tables but no
``flowdesk_meta`` is somebody else's and is refused; a database whose version is newer
than the newest migration here was written by a newer flowdesk and is refused too.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flowdesk import errors

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load(dialect: str) -> list[Migration]:
    """Every migration of a dialect, in order; a gap in the numbers is an error."""
    folder = resources.files("flowdesk.store") / "sql" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise errors.StoreError(
                f"Migration numbers of {dialect} have a gap: expected {expected:04d}, "
                f"found {migration.version:04d}_{migration.name}.sql."
            )
    return found


def latest(dialect: str) -> int:
    return len(load(dialect))


def check_owner(conn: sqlite3.Connection, label: str) -> set[str]:
    """The database's tables; raises `StoreError` when it has tables but no
    ``flowdesk_meta`` (somebody else's database). It only reads, so the SQLite store calls
    it before changing anything (even the journal mode) and a refused file is left as it was."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "flowdesk_meta" not in tables and tables - {"sqlite_sequence"}:
        raise errors.StoreError(
            f"{label!r} is a SQLite database that flowdesk did not create (it has tables "
            f"{', '.join(sorted(tables)[:5])}). Refusing to write to it: point "
            "FLOWDESK_DATABASE_URL at a new file."
        )
    return tables


def migrate_sqlite(conn: sqlite3.Connection, label: str) -> int:
    """Create or upgrade the schema in one ``BEGIN IMMEDIATE`` transaction, so concurrent
    processes opening a new file migrate it exactly once. Returns the version now in force."""
    steps = load("sqlite")
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = check_owner(conn, label)
        if "flowdesk_meta" in tables:
            row = conn.execute(
                "SELECT value FROM flowdesk_meta WHERE key = 'schema_version'"
            ).fetchone()
            current = int(row[0]) if row else 0
        else:
            conn.execute("CREATE TABLE flowdesk_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            current = 0
        if current > len(steps):
            raise errors.SchemaTooNew(
                f"{label!r} has schema version {current}, but this flowdesk knows only up to "
                f"{len(steps)}. Upgrade flowdesk to use this database."
            )
        for migration in steps[current:]:
            for statement in _statements(migration.sql):
                conn.execute(statement)
        conn.execute(
            "INSERT INTO flowdesk_meta (key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(len(steps)),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(steps)


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (no statement here contains a ';' literal)."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


async def migrate_postgres(conn: Any, label: str) -> int:
    """Create or upgrade the schema under an advisory lock, so concurrent processes migrate
    once. A database that already holds tables named like flowdesk's but no
    ``flowdesk_meta`` belongs to something else and is refused."""
    steps = load("postgres")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flowdesk.migrate'))")
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        tables = {r[0] for r in await cur.fetchall()}
        ours = {"runs", "steps", "signals", "versions", "workers", "schedules"}
        if "flowdesk_meta" in tables:
            cur = await conn.execute("SELECT value FROM flowdesk_meta WHERE key = 'schema_version'")
            row = await cur.fetchone()
            current = int(row[0]) if row else 0
        elif tables & ours:
            raise errors.StoreError(
                f"{label}: the database has tables {', '.join(sorted(tables & ours))} that "
                "flowdesk did not create. Refusing to write to it: use a database (or schema) "
                "of its own."
            )
        else:
            await conn.execute(
                "CREATE TABLE flowdesk_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            current = 0
        if current > len(steps):
            raise errors.SchemaTooNew(
                f"{label} has schema version {current}, but this flowdesk knows only up to "
                f"{len(steps)}. Upgrade flowdesk to use this database."
            )
        for migration in steps[current:]:
            for statement in _statements(migration.sql):
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO flowdesk_meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(len(steps)),),
        )
    return len(steps)
