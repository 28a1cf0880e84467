"""A connector call replayed after a crash makes no second effect in the target.

A real ``flowdesk worker`` process runs a workflow whose step calls a connector: the SQL
connector (an upsert into a table of a real PostgreSQL or MariaDB database) or the REST
connector (a POST to a real HTTP server in this test process, which keeps one resource
per ``Idempotency-Key`` and counts requests). Right after the connector returned (the
target did its work and the connector's audit record committed) and before the step's
result is recorded, the worker SIGKILLs itself: the step creates a marker file first, so
only the first worker dies. A second worker recovers the run once the first one's lease
(1.5 s) runs out, runs the step again, and the target shows exactly one effect: one row;
one created resource (two requests, the second answered with the first one's resource).

This file is also the workers' app (``flowdesk worker --app <this file>:app``): the part
below the tests' imports that builds ``app`` is all a worker loads. The REST token comes
from a 0600 secrets file (``$FLOWDESK_SECRETS_FILE``) and is looked for in the workers'
output, the audit records and the target's request log.
"""

from __future__ import annotations

import functools
import json
import os
import secrets as pysecrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import pymysql
import pytest
import sqlalchemy

import flowdesk
from flowdesk.connectors import rest, sql
from flowdesk.connectors import secrets as fsecrets

if TYPE_CHECKING:
    from .conftest import Flow, Proc

THIS_FILE = Path(__file__).resolve()
MARKER_ENV = "FLOWDESK_TEST_CRASH_MARKER"
REST_URL_ENV = "FLOWDESK_TEST_REST_URL"
SQL_URL_ENV = "FLOWDESK_TEST_SQL_URL"
LEASE = 1.5

# -- the workers' app -------------------------------------------------------------------------
app = flowdesk.App()


class InvoiceRow(pydantic.BaseModel):
    customer: str
    amount: int


class Created(pydantic.BaseModel):
    id: str
    customer: str
    amount: int


SAVE = sql.upsert("save_invoice", "invoices", InvoiceRow)
CREATE = rest.operation("create_invoice", "POST", "/invoices", InvoiceRow, Created)


@functools.cache
def ledger() -> sql.SqlConnector:
    return sql.SqlConnector("ledger", app, os.environ[SQL_URL_ENV], timeout=10)


@functools.cache
def crm() -> rest.RestConnector:
    token = fsecrets.load().get("crm.token")  # $FLOWDESK_SECRETS_FILE, mode 0600
    return rest.RestConnector("crm", app, os.environ[REST_URL_ENV], auth=rest.Bearer(token))


def crash_once() -> None:
    """SIGKILL this worker, the first time only: the marker is created before the kill."""
    marker = os.environ.get(MARKER_ENV)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


@app.step(name="book_row")
async def book_row(customer: str, amount: int) -> dict[str, Any]:
    result = await ledger().call(SAVE, InvoiceRow(customer=customer, amount=amount))
    crash_once()  # the row is written, the step's result is not recorded yet
    return {**result.model_dump(), "pid": os.getpid()}


@app.step(name="post_invoice")
async def post_invoice(customer: str, amount: int) -> dict[str, Any]:
    created = await crm().call(CREATE, InvoiceRow(customer=customer, amount=amount))
    crash_once()  # the resource exists, the step's result is not recorded yet
    return {**created.model_dump(), "pid": os.getpid()}


@app.workflow("sql_crash")
async def sql_crash(ctx: flowdesk.Context, customer: str, amount: int) -> dict[str, Any]:
    return await ctx.step(book_row, customer, amount)


@app.workflow("rest_crash")
async def rest_crash(ctx: flowdesk.Context, customer: str, amount: int) -> dict[str, Any]:
    return await ctx.step(post_invoice, customer, amount)


# -- target databases -------------------------------------------------------------------------
POSTGRES_ADMIN = os.environ.get(
    "FLOWDESK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
INVOICES = """
CREATE TABLE invoices (
    id              INTEGER PRIMARY KEY {autoinc},
    idempotency_key VARCHAR(200) NOT NULL UNIQUE,
    customer        VARCHAR(100) NOT NULL,
    amount          INTEGER NOT NULL
)
"""


def _engine(url: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


@pytest.fixture(params=["postgres", "mariadb"])
def sql_target(request: pytest.FixtureRequest) -> Iterator[str]:
    """A new database ``flowdesk_conn_<hex>`` with an ``invoices`` table; dropped after."""
    import psycopg

    name = f"flowdesk_conn_{pysecrets.token_hex(6)}"
    if request.param == "postgres":
        try:
            admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN} does not answer: {exc}")
        with admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name
        autoinc = "GENERATED ALWAYS AS IDENTITY"
    else:
        try:
            conn = pymysql.connect(host="127.0.0.1", user="root", password="", connect_timeout=10)
        except pymysql.err.OperationalError as exc:
            pytest.fail(f"MariaDB at 127.0.0.1:3306 does not answer (start it: .ci/run): {exc}")
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        conn.close()
        url = f"mysql+pymysql://root@127.0.0.1:3306/{name}"
        autoinc = "AUTO_INCREMENT"
    engine = _engine(url)
    with engine.begin() as c:
        c.execute(sqlalchemy.text(INVOICES.format(autoinc=autoinc)))
    engine.dispose()
    try:
        yield url
    finally:
        if request.param == "postgres":
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=10) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            conn = pymysql.connect(host="127.0.0.1", user="root", password="", connect_timeout=10)
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            conn.close()


# -- the REST target --------------------------------------------------------------------------
TOKEN = "crash-token-" + pysecrets.token_hex(12)


class RestTarget:
    """Keeps the first answer per Idempotency-Key; counts requests and created resources."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str | None, str | None]] = []  # (key, authorization)
        self.created: dict[str, dict[str, Any]] = {}

    def build(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def create(request: Request) -> Response:
            key = request.headers.get("idempotency-key")
            auth = request.headers.get("authorization")
            body = await request.json()
            with self.lock:
                self.requests.append((key, auth))
                if auth != f"Bearer {TOKEN}":
                    return JSONResponse({"error": "unauthorized"}, status_code=401)
                if not key:
                    return JSONResponse({"error": "Idempotency-Key required"}, status_code=400)
                if key not in self.created:
                    self.created[key] = {"id": f"inv-{len(self.created) + 1}", **body}
                return JSONResponse(self.created[key], status_code=201)

        return Starlette(routes=[Route("/invoices", create, methods=["POST"])])


@pytest.fixture
def rest_target() -> Iterator[tuple[RestTarget, str]]:
    import uvicorn

    target = RestTarget()
    config = uvicorn.Config(
        target.build(), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="rest-target", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the REST target did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield target, f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


# -- the scenario -----------------------------------------------------------------------------
def _worker(flow: Flow, name: str) -> Proc:
    return flow.spawn(
        "worker",
        "--app",
        f"{THIS_FILE}:app",
        "--lease-seconds",
        str(LEASE),
        "--poll-interval",
        "0.1",
        name=name,
    )


def _crash_then_recover(flow: Flow, workflow: str, payload: dict[str, Any]) -> tuple[str, Any]:
    """Start a run; the first worker kills itself after the connector call; a second one
    finishes the run. Returns the run id and ``flowdesk runs show`` of it."""
    marker = flow.root / "crashed"
    flow.env[MARKER_ENV] = str(marker)
    out = flow.cli_json(
        "start", workflow, "--app", f"{THIS_FILE}:app", "--input", json.dumps(payload)
    )
    run_id = str(out["id"])

    first = _worker(flow, "worker-1")
    try:
        first.popen.wait(timeout=60)
    except Exception:
        pytest.fail(f"the first worker did not kill itself: {first.describe()}")
    first.close_files()
    assert first.popen.returncode == -signal.SIGKILL, first.describe()
    assert marker.read_text() == str(first.pid)
    # The crash landed between the target's success and the step's record.
    assert flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,)) == [("running",)]
    assert flow.rows("SELECT COUNT(*) FROM steps WHERE run_id = ?", (run_id,)) == [(0,)]

    second = _worker(flow, "worker-2")
    flow.wait_until(
        lambda: (
            flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0]
            in ("succeeded", "failed", "cancelled")
        ),
        timeout=60,
        what="the second worker to finish the run",
        watch=[second],
    )
    shown = flow.cli_json("runs", "show", run_id)
    assert shown["status"] == "succeeded", json.dumps(shown, indent=1)[:3000]
    assert shown["attempts"] == 2  # claimed by the first worker, then recovered by the second
    assert [(s["seq"], s["status"], s["attempts"]) for s in shown["steps"]] == [(1, "ok", 1)]
    assert shown["output"]["pid"] == second.pid
    flow.stop(second)
    for proc in (first, second):
        assert TOKEN not in proc.output()
    return run_id, shown


def _connector_calls(flow: Flow, name: str) -> list[dict[str, Any]]:
    rows = flow.rows(
        "SELECT data FROM audit WHERE action = 'connector.called' AND subject = ? ORDER BY seq",
        (f"connector:{name}",),
    )
    return [json.loads(r[0]) for r in rows]


@pytest.mark.timeout(120)
def test_sql_upsert_replayed_after_a_crash_writes_one_row(flow: Flow, sql_target: str) -> None:
    flow.env[SQL_URL_ENV] = sql_target
    run_id, shown = _crash_then_recover(flow, "sql_crash", {"customer": "acme", "amount": 70})
    key = f"{run_id}:1"

    engine = _engine(sql_target)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text("SELECT idempotency_key, customer, amount FROM invoices")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(key, "acme", 70)]  # one effect
    assert shown["output"]["inserted"] is False  # the replay found the first worker's row
    calls = _connector_calls(flow, "ledger")
    assert [(c["idempotency_key"], c["status"], c["detail"]) for c in calls] == [
        (key, "ok", "inserted"),
        (key, "ok", "existing row"),
    ]


@pytest.mark.timeout(120)
def test_rest_post_replayed_after_a_crash_creates_one_resource(
    flow: Flow, rest_target: tuple[RestTarget, str]
) -> None:
    target, url = rest_target
    secrets_file = flow.root / "secrets.toml"
    secrets_file.write_text(f'[crm]\ntoken = "{TOKEN}"\n')
    secrets_file.chmod(0o600)
    flow.env[fsecrets.FILE_ENV] = str(secrets_file)
    flow.env[REST_URL_ENV] = url
    run_id, shown = _crash_then_recover(flow, "rest_crash", {"customer": "acme", "amount": 70})
    key = f"{run_id}:1"

    assert target.requests == [(key, f"Bearer {TOKEN}"), (key, f"Bearer {TOKEN}")]
    assert list(target.created) == [key]  # two requests, one created resource
    assert shown["output"]["id"] == target.created[key]["id"] == "inv-1"
    calls = _connector_calls(flow, "crm")
    assert [(c["idempotency_key"], c["status"], c["detail"]) for c in calls] == [
        (key, "ok", "http 201"),
        (key, "ok", "http 201"),
    ]
    assert TOKEN not in json.dumps(calls)
