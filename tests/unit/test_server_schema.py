"""The live OpenAPI schema holds: Schemathesis sends generated requests (valid and invalid)
to every operation of a real server (uvicorn on a free port, SQLite, an embedded worker)
and checks that nothing answers 5xx, that every status is documented, and that every
response body matches its documented schema."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, settings
from pydantic import BaseModel

import flowdesk
from flowdesk import triggers
from flowdesk.assistants import approvals, knowledge, support, tickets
from flowdesk.assistants import invoices as inv
from flowdesk.connectors import sql
from flowdesk.documents.archive import Archive
from flowdesk.engine import tasks
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.server import app as server
from flowdesk.store import people
from flowdesk.triggers import webhooks

EXAMPLES = 20  # per operation and generation mode


@schemathesis.serializer(
    "application/pdf", "image/png", "image/jpeg", "image/tiff", "message/rfc822"
)
def _file_bytes(ctx: Any, value: Any) -> bytes:
    """Documents go as the file's own bytes (``POST /invoices``)."""
    return value if isinstance(value, bytes) else str(value).encode()


class Review(BaseModel):
    approved: bool
    comment: str = ""


def register(app: flowdesk.App) -> None:
    @app.step(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.workflow("sum")
    async def sum_(ctx: flowdesk.Context, a: int, b: int = 1) -> int:
        return int(await ctx.step(add, a, b))

    @app.step(name="boom")
    async def boom() -> None:
        raise RuntimeError("broken on purpose")

    @app.workflow("broken")
    async def broken(ctx: flowdesk.Context) -> None:
        await ctx.step(boom)

    @app.workflow("waiter")
    async def waiter(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("go")

    @app.workflow("review")
    async def review(ctx: flowdesk.Context, doc: str = "contract") -> Any:
        decision = await ctx.human_task(
            "review",
            title=f"Review {doc}",
            form=Review,
            context={"doc": doc},
            candidates=tasks.Assignees(roles=["approver"]),
        )
        return decision.model_dump()


@dataclass
class Live:
    base_url: str
    secret: str
    aims: dict[str, dict[str, Any]]  # operation label -> fixed parts aimed at real things


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _in_thread(fn: Any) -> Any:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


def _prepare(url: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """An admin token, a spare user with a token, runs in every state, three open tasks;
    and, per operation, path parameters (and bodies) that name them."""

    async def setup() -> tuple[str, dict[str, dict[str, Any]]]:
        app = flowdesk.App(url, poll_interval=0.05)
        register(app)
        async with app, app.worker():
            ids = identity.Identity(app)
            await ids.create_user("admin", roles=["admin"])
            await ids.create_user("sam", roles=["approver"], groups=["ops"])
            secret = (await ids.create_token("admin"))[1]
            token = (await ids.create_token("sam"))[0]
            done = await app.start("sum", {"a": 1, "b": 2})
            await done.result(timeout=10)
            failed = await app.start("broken")
            with pytest.raises(flowdesk.RunFailed):
                await failed.result(timeout=10)
            signalled, cancelled = await app.start("waiter"), await app.start("waiter")
            tasks_ = []
            for doc in ("lease", "offer", "memo"):
                run = await app.start("review", {"doc": doc})
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    page = await app.store.list_tasks(people.TaskQuery(run_id=run.id))
                    if page.items:
                        tasks_.append(page.items[0].id)
                        break
                    await asyncio.sleep(0.02)
            assert len(tasks_) == 3, "the review tasks were not created"
        task, completed, drafted = ({"task_id": t} for t in tasks_)
        aims: dict[str, dict[str, Any]] = {
            "POST /runs": {"body": {"workflow": "sum", "input": {"a": 2}}},
            "GET /runs/{run_id}": {"path_parameters": {"run_id": done.id}},
            "GET /runs/{run_id}/steps": {"path_parameters": {"run_id": done.id}},
            "POST /runs/{run_id}/signals/{name}": {
                "path_parameters": {"run_id": signalled.id, "name": "go"}
            },
            "POST /runs/{run_id}/cancel": {"path_parameters": {"run_id": cancelled.id}},
            "POST /runs/{run_id}/retry": {"path_parameters": {"run_id": failed.id}},
            "GET /tasks/{task_id}": {"path_parameters": task},
            "POST /tasks/{task_id}/claim": {"path_parameters": task},
            "POST /tasks/{task_id}/unclaim": {"path_parameters": task},
            "POST /tasks/{task_id}/comments": {"path_parameters": task},
            "POST /tasks/{task_id}/delegate": {"path_parameters": task, "body": {"user": "sam"}},
            "PUT /tasks/{task_id}/draft": {"path_parameters": drafted},
            "POST /tasks/{task_id}/complete": {
                "path_parameters": completed,
                "body": {"data": {"approved": True}},
            },
            "PATCH /users/{user_id}": {"path_parameters": {"user_id": "sam"}},
            "GET /users/{user_id}/tokens": {"path_parameters": {"user_id": "sam"}},
            "POST /users/{user_id}/tokens": {"path_parameters": {"user_id": "sam"}},
            "DELETE /users/{user_id}/tokens/{token_id}": {
                "path_parameters": {"user_id": "sam", "token_id": token.id}
            },
        }
        return secret, aims

    result: tuple[str, dict[str, dict[str, Any]]] = _in_thread(setup)
    return result


def _hook_aim(app: flowdesk.App, folder: Path) -> dict[str, Any]:
    """A webhook ``ping`` (starts ``waiter``) and one delivery signed for it: the body ``{}``
    as the client sends it. Its first copy starts a run (201), the others are replays (200)."""
    (folder / "ping.secret").write_text("ping-secret")
    triggers.webhook(
        app, "ping", workflow="waiter", secret_file=folder / "ping.secret", tolerance=3600
    )
    headers = webhooks.signed_headers("ping-secret", b"{}", "schema-delivery")
    del headers["Content-Type"]
    return {"path_parameters": {"name": "ping"}, "headers": headers, "body": {}}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder: Path = tmp_path_factory.mktemp("schema")
    url = f"sqlite:///{folder / 'api.db'}"
    secret, aims = _prepare(url)
    app = flowdesk.App(url, poll_interval=0.05)
    register(app)
    aims["POST /hooks/{name}"] = _hook_aim(app, folder)
    approvals.Approvals(app, Path(__file__).parents[2] / "data" / "approvals" / "policy.toml")
    support.Support(app, knowledge.KnowledgeBase([]), tickets.TicketDesk())
    aims["POST /approvals"] = {
        "body": {
            "type": "access",
            "amount": 0,
            "currency": "EUR",
            "cost_centre": "CC-100",
            "justification": "read access to the wiki",
        }
    }
    aims["POST /messages"] = {"body": {"thread_id": "t1", "customer": "c1", "text": "hello"}}
    aims["POST /messages/email"] = {
        "body": b"From: c@example.com\r\nMessage-ID: <m1@example.com>\r\n\r\nhello\r\n",
        "media_type": "message/rfc822",
    }
    erp_file = folder / "erp.db"
    with sqlite3.connect(erp_file) as conn:
        for ddl in inv.ERP_DDL:
            conn.execute(ddl)
    erp = sql.SqlConnector("erp", app, f"sqlite:///{erp_file}")
    inv.Invoices(app, Archive(folder / "documents"), inv.Erp(erp))
    sample = Path(__file__).parents[2] / "tests" / "data" / "invoices"
    aims["POST /invoices"] = {
        "body": (sample / "inv-2025-0012-L4-en_IE.pdf").read_bytes(),
        "media_type": "application/pdf",
    }
    log = audit_log.AuditLog(app, folder / "audit.key")
    api = server.create_app(app, audit=log, worker=True)
    port = _free_port()
    config = uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", secret, aims)
    finally:
        srv.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        asyncio.run(erp.aclose())


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.response_schema_conformance,
]


def _exercise(strategy: Any, headers: dict[str, str], seen: Counter[tuple[str, int]]) -> None:
    @hypothesis.given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=10)
        seen[case.operation.label, response.status_code] += 1

    run()


def test_the_live_api_conforms_to_its_openapi_schema(live: Live) -> None:
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json", timeout=10)
    headers = {"Authorization": f"Bearer {live.secret}"}
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        passes: list[tuple[str, Any]] = [
            ("positive", operation.as_strategy(schemathesis.GenerationMode.POSITIVE))
        ]
        if any(operation.iter_parameters()) or operation.body:  # something to get wrong
            negative = operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)
            passes.append(("negative", negative))
        aim = live.aims.get(operation.label)
        if aim is not None:  # at things that exist, so that success bodies are checked too
            aimed = operation.as_strategy(schemathesis.GenerationMode.POSITIVE, **aim)
            passes.append(("aimed", aimed))
        for label, strategy in passes:
            try:
                _exercise(strategy, headers, seen)
            except (Exception, BaseExceptionGroup) as exc:  # report every operation
                failures.append(f"{operation.label} ({label}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(labels) >= 27 and set(live.aims) <= set(labels)
    succeeded = {label for (label, status), _ in seen.items() if status < 300}
    assert succeeded == set(labels), f"never answered 2xx: {set(labels) - succeeded}"
