"""Bad input is refused clearly and changes nothing: unknown workflows, invalid input,
unserializable results, and database files that are not flowdesk's."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pydantic
import pytest
from psycopg import sql as pgsql

import flowdesk
from flowdesk.errors import SchemaTooNew, StoreError
from flowdesk.store import migrations


class Order(pydantic.BaseModel):
    order_id: str
    amount: float = pydantic.Field(gt=0)
    items: int = 1


class StrictOrder(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    order_id: str


def _register(app: flowdesk.App) -> None:
    @app.workflow("by_model")
    async def by_model(ctx: flowdesk.Context, order: Order) -> dict[str, Any]:
        return {"type": type(order).__name__, **order.model_dump()}

    @app.workflow("by_kwargs")
    async def by_kwargs(
        ctx: flowdesk.Context, order_id: str, amount: float, items: int = 1
    ) -> dict[str, Any]:
        return {"order_id": order_id, "amount": amount, "items": items}

    @app.workflow("by_strict_model")
    async def by_strict_model(ctx: flowdesk.Context, order: StrictOrder) -> str:
        return order.order_id


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_an_unknown_workflow_is_refused_and_nothing_is_stored(app):
    _register(app)

    async def not_registered(ctx: flowdesk.Context) -> None:
        return None

    async with app:
        await app.start("by_kwargs", {"order_id": "A", "amount": 1})
        before = await app.store.count_runs()
        with pytest.raises(flowdesk.UnknownWorkflow) as info:
            await app.start("no.such.workflow", {"x": 1})
        message = str(info.value)
        assert "'no.such.workflow'" in message
        assert "by_kwargs" in message and "by_model" in message  # what is known
        assert info.value.name == "no.such.workflow"
        with pytest.raises(flowdesk.UnknownWorkflow):
            await app.start(not_registered)
        assert await app.store.count_runs() == before == 1


@pytest.mark.parametrize(
    ("workflow", "payload", "fields"),
    [
        ("by_model", {"order_id": "A", "amount": "lots"}, ["amount"]),
        ("by_model", {"amount": 5}, ["order_id"]),
        ("by_model", {"order_id": "A", "amount": -1}, ["amount"]),
        (
            "by_model",
            {"order_id": ["not", "a", "string"], "amount": 1, "items": "x"},
            ["order_id", "items"],
        ),
        ("by_kwargs", {"order_id": "A"}, ["amount"]),
        ("by_kwargs", {"order_id": "A", "amount": 1, "colour": "red"}, ["colour"]),
        ("by_kwargs", {"order_id": 5, "amount": "x"}, ["order_id", "amount"]),
        ("by_strict_model", {"order_id": "A", "colour": "red"}, ["colour"]),
    ],
)
async def test_invalid_input_is_refused_naming_the_fields(app, workflow, payload, fields):
    _register(app)
    async with app:
        with pytest.raises(flowdesk.InvalidInput) as info:
            await app.start(workflow, payload)
        assert await app.store.count_runs() == 0
    message = str(info.value)
    assert f"workflow {workflow!r}" in message
    for field in fields:
        assert field in message
    assert info.value.workflow == workflow
    assert {str(e["loc"][0]) for e in info.value.errors} == set(fields)


@pytest.mark.parametrize("payload", [[1, 2], "text", 42])
async def test_input_that_is_not_an_object_is_refused(app, payload):
    _register(app)
    async with app:
        with pytest.raises(flowdesk.InvalidInput, match="JSON object"):
            await app.start("by_kwargs", payload)
        assert await app.store.count_runs() == 0


async def test_valid_input_is_validated_and_coerced(app):
    _register(app)
    async with app, app.worker(concurrency=2):
        a = await app.start("by_model", {"order_id": "A", "amount": "2.5"})
        b = await app.start("by_model", Order(order_id="B", amount=3))
        c = await app.start("by_kwargs", {"order_id": "C", "amount": 1})
        assert await app.result(a.id, timeout=10) == {
            "type": "Order",
            "order_id": "A",
            "amount": 2.5,
            "items": 1,
        }
        assert await app.result(b.id, timeout=10) == {
            "type": "Order",
            "order_id": "B",
            "amount": 3.0,
            "items": 1,
        }
        assert await app.result(c.id, timeout=10) == {"order_id": "C", "amount": 1.0, "items": 1}
        # The stored input is the validated one, defaults included.
        assert (await app.get_run(c.id)).input == {"order_id": "C", "amount": 1.0, "items": 1}


async def test_a_child_started_with_invalid_input_fails_the_parent_clearly(app):
    _register(app)

    @app.workflow("bad_parent")
    async def bad_parent(ctx: flowdesk.Context) -> Any:
        return await ctx.child("by_kwargs", {"order_id": "A"})

    async with app, app.worker(concurrency=2):
        h = await app.start("bad_parent")
        with pytest.raises(flowdesk.RunFailed) as info:
            await app.result(h.id, timeout=10)
        assert await app.store.count_runs() == 1
    assert info.value.error["type"] == "InvalidInput"
    assert "amount" in info.value.error["message"]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(object(), "object"), (float("nan"), "float"), ({"when": Ellipsis}, "dict")],
    ids=["object", "nan", "nested"],
)
async def test_a_step_result_that_is_not_json_fails_the_run_clearly(app, value, type_name):
    calls: Counter[str] = Counter()

    @app.step(name="make_thing", retries=3, retry_delay=0.001)
    async def make_thing() -> Any:
        calls["make_thing"] += 1
        return value

    @app.step(name="never")
    async def never() -> None:
        calls["never"] += 1

    @app.workflow("unstorable")
    async def unstorable(ctx: flowdesk.Context) -> None:
        await ctx.step(make_thing)
        await ctx.step(never)

    async with app, app.worker(concurrency=2):
        h = await app.start("unstorable")
        with pytest.raises(flowdesk.RunFailed) as info:
            await app.result(h.id, timeout=10)
        steps = await app.steps(h.id)
        run = await app.get_run(h.id)

    assert calls == {"make_thing": 1}  # not retried: it would fail the same way
    assert run.failed_seq == 1
    assert info.value.error["type"] == "StepFailed"
    assert "SerializationError" in info.value.error["message"]
    assert len(steps) == 1
    step = steps[0]
    assert (step.name, step.status, step.attempts, step.output) == ("make_thing", "error", 1, None)
    assert step.error is not None and step.error["type"] == "SerializationError"
    assert "result of step 'make_thing'" in step.error["message"]
    assert f"of type {type_name}" in step.error["message"]
    assert "cannot be stored as JSON" in step.error["message"]


async def test_a_workflow_result_that_is_not_json_fails_the_run_clearly(app):
    @app.workflow("bad_result")
    async def bad_result(ctx: flowdesk.Context) -> Any:
        return object()

    async with app, app.worker(concurrency=2):
        h = await app.start("bad_result")
        with pytest.raises(flowdesk.RunFailed) as info:
            await app.result(h.id, timeout=10)
    assert info.value.error["type"] == "SerializationError"
    assert "result of workflow 'bad_result'" in info.value.error["message"]


# -- database files that are not flowdesk's --------------------------------------------


async def _open_refused(where: Path | str, error: type[Exception]) -> str:
    """Open the database (a SQLite file, or a URL) and expect ``error``; its message."""
    url = where if isinstance(where, str) else f"sqlite:///{where}"
    app = flowdesk.App(url, poll_interval=0.05)

    @app.workflow("w")
    async def w(ctx: flowdesk.Context) -> None:
        return None

    with pytest.raises(error) as info:
        await app.open()
    with pytest.raises(error):
        await app.start("w")  # every entry point refuses the same way
    await app.close()
    return str(info.value)


@pytest.mark.sqlite_only
async def test_a_junk_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 200)
    before = _digest(path)

    message = await _open_refused(path, StoreError)

    assert "not a flowdesk database" in message
    assert str(path) in message
    assert _digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["notes.db"]


@pytest.mark.sqlite_only
async def test_another_apps_sqlite_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "billing.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL NOT NULL)")
    conn.executemany("INSERT INTO invoices (total) VALUES (?)", [(9.5,), (12.0,)])
    conn.commit()
    conn.close()
    before = _digest(path)

    message = await _open_refused(path, StoreError)

    assert "did not create" in message and "invoices" in message
    assert str(path) in message
    assert _digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["billing.db"]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("SELECT COUNT(*) FROM invoices").fetchone()[0] == 2
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert tables == {"invoices"}


@pytest.mark.sqlite_only
async def test_a_schema_newer_than_the_code_is_refused_on_sqlite(tmp_path):
    path = tmp_path / "future.db"
    app = flowdesk.App(f"sqlite:///{path}")
    await app.open()
    await app.close()
    newest = migrations.latest("sqlite")
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE flowdesk_meta SET value = ? WHERE key = 'schema_version'", (str(newest + 1),)
    )
    conn.commit()
    conn.close()
    before = _digest(path)

    message = await _open_refused(path, SchemaTooNew)

    assert f"schema version {newest + 1}" in message and str(newest) in message
    assert "Upgrade flowdesk" in message
    assert _digest(path) == before
    assert issubclass(SchemaTooNew, StoreError)


def _postgres_snapshot(url: str) -> dict[str, Any]:
    """Everything a refused open could have changed: every table and column of the
    database's schemas, and the rows of its tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name, data_type"
            " FROM information_schema.columns"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " ORDER BY 1, 2, 3"
        ).fetchall()
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for schema, table in sorted({(c[0], c[1]) for c in columns}):
            rows[f"{schema}.{table}"] = sorted(
                conn.execute(
                    pgsql.SQL("SELECT * FROM {}.{}").format(
                        pgsql.Identifier(schema), pgsql.Identifier(table)
                    )
                ).fetchall(),
                key=repr,
            )
        indexes = conn.execute(
            "SELECT schemaname, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
    return {"columns": columns, "rows": rows, "indexes": indexes}


async def test_another_programs_postgres_runs_table_is_refused_and_left_untouched(
    new_postgres_db,
):
    url = new_postgres_db(migrated=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE runs (id SERIAL PRIMARY KEY, mileage REAL NOT NULL)")
        conn.execute("INSERT INTO runs (mileage) VALUES (5.5), (10.0)")
    before = _postgres_snapshot(url)
    assert before["rows"] == {"public.runs": [(1, 5.5), (2, 10.0)]}

    message = await _open_refused(url, StoreError)

    assert "did not create" in message and "runs" in message
    assert urlsplit(url).path.lstrip("/") in message  # names the database
    assert _postgres_snapshot(url) == before  # no flowdesk_meta, no schema, same rows


async def test_a_postgres_schema_newer_than_the_code_is_refused(new_postgres_db):
    url = new_postgres_db()  # migrated by this flowdesk
    newest = migrations.latest("postgres")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE flowdesk_meta SET value = '999' WHERE key = 'schema_version'")
    before = _postgres_snapshot(url)
    assert ("schema_version", "999") in before["rows"]["public.flowdesk_meta"]

    message = await _open_refused(url, SchemaTooNew)

    assert "schema version 999" in message and str(newest) in message
    assert "Upgrade flowdesk" in message
    assert _postgres_snapshot(url) == before


async def test_a_postgres_server_that_does_not_answer_is_a_store_error():
    with socket.socket() as taken:  # a port of ours that nothing listens on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        url = f"postgresql://flowdesk:secret@127.0.0.1:{port}/flows"
        message = await _open_refused(url, StoreError)
    assert "Cannot connect to PostgreSQL" in message
    assert f"127.0.0.1:{port}/flows" in message
    assert "secret" not in message  # the password is not shown


@pytest.mark.sqlite_only
async def test_a_missing_folder_is_a_configuration_error(tmp_path):
    app = flowdesk.App(f"sqlite:///{tmp_path}/missing/dir/t.db")
    with pytest.raises(flowdesk.errors.ConfigurationError, match="does not exist"):
        await app.open()
    assert not (tmp_path / "missing").exists()


async def test_an_unsupported_database_url_is_a_configuration_error():
    app = flowdesk.App("mysql://localhost/flows")
    with pytest.raises(flowdesk.errors.ConfigurationError, match="Unsupported database URL"):
        await app.open()
    with pytest.raises(flowdesk.errors.ConfigurationError):
        flowdesk.App("sqlite:///t.db", poll_interval=0)
