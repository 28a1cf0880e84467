"""The REST API (`flowdesk.server`), in process through httpx's ASGI transport, on both
stores: runs, human tasks, tokens, the role × endpoint matrix, audit export."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

import flowdesk
from flowdesk import RunStatus, errors, triggers
from flowdesk.assistants import approvals, knowledge, support, tickets
from flowdesk.assistants import invoices as inv
from flowdesk.connectors import sql
from flowdesk.documents.archive import Archive
from flowdesk.engine import tasks
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.server import app as server
from flowdesk.store import audit as store_audit
from flowdesk.store import people
from flowdesk.triggers import webhooks

HOOK_SECRET = "ping-secret"

# user id -> (roles, groups)
USERS: dict[str, tuple[list[str], list[str]]] = {
    "root": (["admin"], []),
    "olga": (["operator"], []),
    "anna": (["approver"], ["finance"]),
    "vera": (["viewer"], ["finance"]),
    "bob": (["approver"], ["legal"]),
}


class Decision(BaseModel):
    approved: bool
    amount: int = Field(ge=0)
    note: str = ""


def register(app: flowdesk.App) -> dict[str, int]:
    calls = {"flaky": 0}

    @app.step(name="boom")
    async def boom() -> None:
        raise RuntimeError("always broken")

    @app.step(name="flaky_once")
    async def flaky_once() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("first attempt fails")
        return "fixed"

    @app.step(name="double")
    async def double(n: int) -> int:
        return 2 * n

    @app.workflow("echo")
    async def echo(ctx: flowdesk.Context, n: int) -> int:
        return int(await ctx.step(double, n))

    @app.workflow("waiter")
    async def waiter(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("go")

    @app.workflow("broken")
    async def broken(ctx: flowdesk.Context) -> None:
        await ctx.step(boom)

    @app.workflow("flaky")
    async def flaky(ctx: flowdesk.Context) -> str:
        return str(await ctx.step(flaky_once))

    @app.workflow("approval")
    async def approval(ctx: flowdesk.Context, amount: int, four_eyes: bool = False) -> Any:
        decision = await ctx.human_task(
            "approve",
            title=f"Approve {amount}",
            form=Decision,
            context={"amount": amount},
            candidates=tasks.Assignees(groups=["finance"]),
            four_eyes=four_eyes,
        )
        return decision.model_dump()

    return calls


@dataclass
class Env:
    app: flowdesk.App
    client: httpx.AsyncClient
    tokens: dict[str, str]
    wait_until: Callable[..., Awaitable[Any]]
    wait_status: Callable[..., Awaitable[flowdesk.Run]]

    async def call(
        self,
        method: str,
        path: str,
        who: str | None = None,
        *,
        token: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        secret = token if token is not None else self.tokens.get(who or "")
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def start(self, workflow: str, input: Any = None, who: str = "olga") -> str:
        r = await self.call("POST", "/runs", who, json={"workflow": workflow, "input": input})
        assert r.status_code == 201, r.text
        run_id: str = r.json()["id"]
        return run_id

    async def task_of(self, run_id: str) -> str:
        async def found() -> str | None:
            page = await self.app.store.list_tasks(people.TaskQuery(run_id=run_id))
            return page.items[0].id if page.items else None

        task_id: str = await self.wait_until(found, what=f"a task of run {run_id}")
        return task_id


@pytest.fixture
async def env(app, tmp_path, wait_until, wait_status) -> AsyncIterator[Env]:
    register(app)
    (tmp_path / "ping.secret").write_text(HOOK_SECRET)
    triggers.webhook(app, "ping", workflow="echo", secret_file=tmp_path / "ping.secret")
    async with app:
        ids = identity.Identity(app)
        tokens = {}
        for uid, (roles, groups) in USERS.items():
            await ids.create_user(uid, roles=roles, groups=groups)
            tokens[uid] = (await ids.create_token(uid))[1]
        api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
        transport = httpx.ASGITransport(app=api)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://flowdesk.test") as client,
            app.worker(concurrency=20),
        ):
            yield Env(app, client, tokens, wait_until, wait_status)


def error(r: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["error"] == name, body
    assert body["message"]
    return body


# -- health, runs ------------------------------------------------------------------------


async def test_health_and_ready_need_no_token(env):
    assert (await env.call("GET", "/health")).json() == {"status": "ok"}
    r = await env.call("GET", "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    me = (await env.call("GET", "/me", "anna")).json()
    assert me["id"] == "anna" and me["groups"] == ["finance"]
    assert set(me["permissions"]) == {"tasks:read", "tasks:act"}


async def test_start_honours_the_idempotency_key_and_records_the_initiator(env):
    body = {"workflow": "echo", "input": {"n": 4}}
    key = {"Idempotency-Key": "order-17"}
    first = await env.call("POST", "/runs", "olga", json=body, headers=key)
    assert first.status_code == 201 and first.json()["created"] is True
    again = await env.call("POST", "/runs", "olga", json=body, headers=key)
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"]
    assert store_audit.ACTOR.get() == "system"  # the request's acting user did not leak
    assert first.json()["idempotency_key"] == "order-17"
    other = {"workflow": "echo", "input": {"n": 5}}
    error(
        await env.call("POST", "/runs", "olga", json=other, headers=key), 409, "IdempotencyConflict"
    )

    run_id = first.json()["id"]
    run = await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)
    assert run.output == 8
    log = audit_log.AuditLog(env.app)
    rows = [r async for r in log.rows(subject=f"run:{run_id}")]
    created = next(r for r in rows if r["action"] == "run.started")
    assert created["actor"] == "olga" and created["data"]["initiator"] == "olga"


async def test_start_refusals_carry_field_errors(env):
    r = await env.call("POST", "/runs", "olga", json={"workflow": "nope"})
    error(r, 404, "UnknownWorkflow")
    r = await env.call("POST", "/runs", "olga", json={"workflow": "echo", "input": {"n": "x"}})
    body = error(r, 422, "InvalidInput")
    assert [e["field"] for e in body["errors"]] == ["n"]
    r = await env.call("POST", "/runs", "olga", json={"workflow": "echo", "input": [1]})
    body = error(r, 422, "InvalidRequest")
    assert body["errors"][0]["field"] == "body.input"
    r = await env.call("POST", "/runs", "olga", json={"workflow": "", "extra": 1})
    assert {e["field"] for e in error(r, 422, "InvalidRequest")["errors"]} == {
        "body.workflow",
        "body.extra",
    }
    r = await env.call(
        "POST", "/runs", "olga", content=b"{not json", headers={"content-type": "application/json"}
    )
    error(r, 422, "InvalidRequest")


async def test_list_get_and_steps(env):
    ids = [await env.start("echo", {"n": n}) for n in range(5)]
    for run_id in ids:
        await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"workflow": "echo", "limit": 2, "status": "succeeded"}
        if cursor:
            params["cursor"] = cursor
        page = (await env.call("GET", "/runs", "vera", params=params)).json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))

    # A viewer sees the run and its timeline, its payloads masked (no payload:read) ...
    masked = {"$masked": "needs the payload:read permission"}
    run = (await env.call("GET", f"/runs/{ids[0]}", "vera")).json()
    assert run["status"] == "succeeded" and run["output"] == masked and run["input"] == masked
    viewed = (await env.call("GET", f"/runs/{ids[3]}/steps", "vera")).json()
    assert [(s["name"], s["status"], s["output"]) for s in viewed] == [("double", "ok", masked)]
    # ... an admin sees them decrypted.
    run = (await env.call("GET", f"/runs/{ids[0]}", "root")).json()
    assert run["status"] == "succeeded" and run["output"] == 0 and run["input"] == {"n": 0}
    assert run["finished_at"].startswith("20") and "T" in run["created_at"]
    steps = (await env.call("GET", f"/runs/{ids[3]}/steps", "root")).json()
    assert len(steps) == 1
    step = steps[0]
    assert {k: step[k] for k in ("seq", "name", "kind", "status", "attempts", "output")} == {
        "seq": 1,
        "name": "double",
        "kind": "step",
        "status": "ok",
        "attempts": 1,
        "output": 6,
    }
    assert step["duration_ms"] >= 0 and step["error"] is None and step["finished_at"]

    error(await env.call("GET", "/runs/nope", "vera"), 404, "RunNotFound")
    error(await env.call("GET", "/runs/nope/steps", "vera"), 404, "RunNotFound")
    for params in ({"limit": 0}, {"limit": 501}, {"status": "bogus"}, {"cursor": "!!"}):
        error(await env.call("GET", "/runs", "vera", params=params), 422, "InvalidRequest")
    huge = "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5Ojp4"  # 9999...:x, past any integer column
    error(await env.call("GET", "/runs", "vera", params={"cursor": huge}), 422, "InvalidRequest")
    error(await env.call("GET", "/runs/a%00b", "vera"), 422, "InvalidRequest")
    error(await env.call("GET", "/tasks", "vera", params={"kind": "a\x00"}), 422, "InvalidRequest")


async def test_signal_cancel_and_retry(env):
    waiting = await env.start("waiter")
    await env.wait_status(env.app, waiting, RunStatus.WAITING)
    r = await env.call("POST", f"/runs/{waiting}/signals/go", "olga", json={"payload": {"ok": 1}})
    assert r.status_code == 202 and r.json() == {"run_id": waiting, "name": "go"}
    assert (await env.wait_status(env.app, waiting, RunStatus.SUCCEEDED)).output == {"ok": 1}
    error(await env.call("POST", f"/runs/{waiting}/signals/go", "olga"), 409, "InvalidState")
    r = await env.call("POST", f"/runs/{waiting}/signals/flowdesk.task:x", "olga")
    error(r, 422, "InvalidRequest")
    error(await env.call("POST", "/runs/nope/signals/go", "olga"), 404, "RunNotFound")

    doomed = await env.start("waiter")
    await env.wait_status(env.app, doomed, RunStatus.WAITING)
    r = await env.call("POST", f"/runs/{doomed}/cancel", "olga", json={"reason": "not needed"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # An operator has no payload:read: the error keeps its type, the message is masked.
    assert r.json()["error"] == {
        "type": "Cancelled",
        "$masked": "needs the payload:read permission",
    }
    run = (await env.call("GET", f"/runs/{doomed}", "root")).json()
    assert run["error"] == {"type": "Cancelled", "message": "not needed"}
    error(await env.call("POST", f"/runs/{waiting}/cancel", "olga"), 409, "InvalidState")
    other = await env.start("waiter")
    await env.wait_status(env.app, other, RunStatus.WAITING)
    r = await env.call("POST", f"/runs/{other}/cancel", "root")
    assert r.json()["error"]["message"] == "cancelled by root"

    flaky = await env.start("flaky")
    await env.wait_status(env.app, flaky, RunStatus.FAILED)
    error(await env.call("POST", f"/runs/{waiting}/retry", "olga"), 409, "InvalidState")
    r = await env.call("POST", f"/runs/{flaky}/retry", "olga")
    assert r.status_code == 200 and r.json()["id"] == flaky
    assert (await env.wait_status(env.app, flaky, RunStatus.SUCCEEDED)).output == "fixed"
    error(await env.call("POST", "/runs/nope/retry", "olga"), 404, "RunNotFound")


# -- human tasks ---------------------------------------------------------------------------


async def test_a_task_completed_through_the_api_resumes_its_run(env):
    run_id = await env.start("approval", {"amount": 250})
    task_id = await env.task_of(run_id)
    listed = (await env.call("GET", "/tasks", "anna", params={"run_id": run_id})).json()
    assert [t["id"] for t in listed["items"]] == [task_id]
    detail = (await env.call("GET", f"/tasks/{task_id}", "anna")).json()
    assert detail["status"] == "open" and detail["context"] == {"amount": 250}
    assert detail["initiator"] == "olga" and detail["groups"] == ["finance"]
    assert set(detail["form_schema"]["required"]) == {"approved", "amount"}

    r = await env.call("PUT", f"/tasks/{task_id}/draft", "anna", json={"data": {"note": "half"}})
    assert r.status_code == 200 and r.json()["draft"] == {"note": "half"}
    r = await env.call("POST", f"/tasks/{task_id}/claim", "anna")
    assert r.status_code == 200 and r.json()["assignee"] == "anna"
    r = await env.call("POST", f"/tasks/{task_id}/comments", "anna", json={"text": "checking"})
    assert r.status_code == 201 and r.json()["kind"] == "comment" and r.json()["actor"] == "anna"
    error(
        await env.call("POST", f"/tasks/{task_id}/comments", "anna", json={"text": " "}),
        422,
        "InvalidRequest",
    )

    bad = {"data": {"approved": "maybe", "amount": -1}}
    body = error(
        await env.call("POST", f"/tasks/{task_id}/complete", "anna", json=bad), 422, "InvalidForm"
    )
    fields = {e["field"]: e for e in body["errors"]}
    assert set(fields) == {"approved", "amount"}
    assert fields["amount"]["type"] == "minimum" and fields["approved"]["message"]
    still = (await env.call("GET", f"/tasks/{task_id}", "anna")).json()
    assert still["status"] == "claimed" and still["result"] is None
    assert (await env.app.get_run(run_id)).status is RunStatus.WAITING

    good = {"data": {"approved": True, "amount": 250}}
    r = await env.call("POST", f"/tasks/{task_id}/complete", "anna", json=good)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "completed" and done["completed_by"] == "anna"
    assert [e["kind"] for e in done["events"]] == ["claimed", "comment", "completed"]
    run = await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)
    assert run.output == {"approved": True, "amount": 250, "note": ""}
    r = await env.call("POST", f"/tasks/{task_id}/complete", "anna", json=good)
    error(r, 409, "InvalidState")
    steps = (await env.call("GET", f"/runs/{run_id}/steps", "olga")).json()
    assert [(s["kind"], s["name"], s["status"]) for s in steps] == [("task", "task:approve", "ok")]


async def test_four_eyes_refuses_the_initiator(env):
    run_id = await env.start("approval", {"amount": 9000, "four_eyes": True}, who="olga")
    task_id = await env.task_of(run_id)
    good = {"data": {"approved": True, "amount": 9000}}
    r = await env.call("POST", f"/tasks/{task_id}/complete", "olga", json=good)
    error(r, 403, "FourEyesViolation")
    error(await env.call("POST", f"/tasks/{task_id}/claim", "olga"), 403, "FourEyesViolation")
    assert (await env.call("GET", f"/tasks/{task_id}", "olga")).json()["status"] == "open"
    r = await env.call("POST", f"/tasks/{task_id}/complete", "root", json=good)
    assert r.status_code == 200 and r.json()["completed_by"] == "root"
    await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)


async def test_a_non_candidate_does_not_see_the_task(env):
    run_id = await env.start("approval", {"amount": 1})
    task_id = await env.task_of(run_id)
    assert (await env.call("GET", "/tasks", "bob")).json()["items"] == []
    error(await env.call("GET", f"/tasks/{task_id}", "bob"), 404, "TaskNotFound")
    error(await env.call("POST", f"/tasks/{task_id}/claim", "bob"), 404, "TaskNotFound")
    for who in ("anna", "vera", "olga", "root"):
        items = (await env.call("GET", "/tasks", who)).json()["items"]
        assert [t["id"] for t in items] == [task_id], who
    mine = (await env.call("GET", "/tasks", "anna", params={"mine": True})).json()
    assert mine["items"] == []
    groups = (await env.call("GET", "/tasks", "anna", params={"my_groups": True})).json()
    assert [t["id"] for t in groups["items"]] == [task_id]
    r = await env.call("GET", "/tasks", "anna", params={"status": ["completed", "cancelled"]})
    assert r.json()["items"] == []
    r = await env.call("POST", f"/tasks/{task_id}/delegate", "anna", json={"user": "bob"})
    assert r.status_code == 200 and r.json()["assignee"] == "bob"
    assert [t["id"] for t in (await env.call("GET", "/tasks", "bob")).json()["items"]] == [task_id]
    r = await env.call("POST", f"/tasks/{task_id}/delegate", "bob", json={"user": "ghost"})
    error(r, 404, "NotFound")


# -- tokens ------------------------------------------------------------------------------


async def test_missing_forged_expired_and_revoked_tokens_are_refused(env):
    def unauthorized(r: httpx.Response) -> None:
        error(r, 401, "Unauthenticated")
        assert r.headers["WWW-Authenticate"] == "Bearer"

    unauthorized(await env.call("GET", "/me"))
    unauthorized(await env.call("GET", "/me", token="fdt_forged"))
    unauthorized(await env.call("GET", "/me", headers={"Authorization": "Basic cm9vdDpyb290"}))

    r = await env.call("POST", "/users/vera/tokens", "root", json={"expires_in_seconds": 0.5})
    assert r.status_code == 201 and r.json()["expires_at"]
    short = r.json()["secret"]
    assert (await env.call("GET", "/me", token=short)).status_code == 200
    await asyncio.sleep(0.6)
    unauthorized(await env.call("GET", "/me", token=short))

    r = await env.call("POST", "/users/vera/tokens", "root", json={"name": "laptop"})
    token_id, secret = r.json()["id"], r.json()["secret"]
    assert (await env.call("GET", "/me", token=secret)).status_code == 200
    listed = (await env.call("GET", "/users/vera/tokens", "root")).json()
    assert token_id in [t["id"] for t in listed] and all("secret" not in t for t in listed)
    r = await env.call("DELETE", f"/users/vera/tokens/{token_id}", "root")
    assert r.status_code == 204
    unauthorized(await env.call("GET", "/me", token=secret))
    r = await env.call("DELETE", f"/users/vera/tokens/{token_id}", "root")
    error(r, 404, "NotFound")
    error(await env.call("DELETE", f"/users/anna/tokens/{token_id}", "root"), 404, "NotFound")

    r = await env.call("PATCH", "/users/vera", "root", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    unauthorized(await env.call("GET", "/me", "vera"))


async def test_user_administration(env):
    r = await env.call(
        "POST", "/users", "root", json={"id": "carl", "roles": ["approver"], "groups": ["legal"]}
    )
    assert r.status_code == 201 and r.json()["roles"] == ["approver"]
    error(await env.call("POST", "/users", "root", json={"id": "carl"}), 409, "Conflict")
    error(await env.call("POST", "/users", "root", json={"id": "Bad Id"}), 422, "InvalidRequest")
    r = await env.call("POST", "/users", "root", json={"id": "system-x"})
    error(r, 400, "ConfigurationError")
    r = await env.call("POST", "/users", "root", json={"id": "x", "roles": ["god"]})
    error(r, 422, "InvalidRequest")
    r = await env.call(
        "PATCH", "/users/carl", "root", json={"roles": ["viewer"], "manager": "root"}
    )
    assert r.json()["roles"] == ["viewer"] and r.json()["manager"] == "root"
    error(await env.call("PATCH", "/users/ghost", "root", json={}), 404, "NotFound")
    error(await env.call("POST", "/users/ghost/tokens", "root", json={}), 404, "NotFound")
    r = await env.call("POST", "/users/carl/tokens", "root", json={"expires_in_seconds": 0})
    error(r, 422, "InvalidRequest")
    assert {u["id"] for u in (await env.call("GET", "/users", "root")).json()} == {*USERS, "carl"}


# -- the role × endpoint matrix -------------------------------------------------------------

ROLES = ("root", "olga", "anna", "vera", None)  # admin, operator, approver, viewer, no token

# (method, path, body, {who: status}): "{run}", "{failed}", "{task}", "{claimed}", "{user}"
# and "{token}" are replaced by a fresh resource for each call that should succeed.
APPROVAL = {
    "type": "purchase",
    "amount": 10,
    "currency": "EUR",
    "cost_centre": "CC-100",
    "justification": "pens",
}
MESSAGE = {"thread_id": "th-1", "customer": "c-1", "text": "Where is my card?"}
INVOICE = "invoice.pdf"
MATRIX: list[tuple[str, str, Any, tuple[int, int, int, int, int]]] = [
    ("GET", "/health", None, (200, 200, 200, 200, 200)),
    ("GET", "/ready", None, (200, 200, 200, 200, 200)),
    ("GET", "/metrics", None, (200, 200, 200, 200, 200)),  # open to loopback clients (default)
    ("GET", "/me", None, (200, 200, 200, 200, 401)),
    ("POST", "/runs", {"workflow": "echo", "input": {"n": 1}}, (201, 201, 403, 403, 401)),
    ("GET", "/runs", None, (200, 200, 403, 200, 401)),
    ("GET", "/runs/{run}", None, (200, 200, 403, 200, 401)),
    ("GET", "/runs/{run}/steps", None, (200, 200, 403, 200, 401)),
    ("POST", "/runs/{run}/signals/go", {"payload": 1}, (202, 202, 403, 403, 401)),
    ("POST", "/runs/{run}/cancel", {}, (200, 200, 403, 403, 401)),
    ("POST", "/runs/{failed}/retry", None, (200, 200, 403, 403, 401)),
    ("GET", "/tasks", None, (200, 200, 200, 200, 401)),
    ("GET", "/tasks/{task}", None, (200, 200, 200, 200, 401)),
    ("POST", "/tasks/{task}/claim", None, (200, 200, 200, 403, 401)),
    ("POST", "/tasks/{claimed}/unclaim", None, (200, 200, 200, 403, 401)),
    (
        "POST",
        "/tasks/{task}/complete",
        {"data": {"approved": False, "amount": 3}},
        (200, 200, 200, 403, 401),
    ),
    ("POST", "/tasks/{task}/delegate", {"user": "vera"}, (200, 200, 200, 403, 401)),
    ("POST", "/tasks/{task}/comments", {"text": "hi"}, (201, 201, 201, 403, 401)),
    ("PUT", "/tasks/{task}/draft", {"data": {"note": "x"}}, (200, 200, 200, 403, 401)),
    ("GET", "/audit/export", None, (200, 200, 403, 403, 401)),
    ("GET", "/audit/verify", None, (200, 200, 403, 403, 401)),
    ("POST", "/audit/checkpoint", None, (201, 403, 403, 403, 401)),
    ("POST", "/users", {"id": "{user}"}, (201, 403, 403, 403, 401)),
    ("GET", "/users", None, (200, 403, 403, 403, 401)),
    ("PATCH", "/users/dora", {"groups": ["ops"]}, (200, 403, 403, 403, 401)),
    ("GET", "/users/dora/tokens", None, (200, 403, 403, 403, 401)),
    ("POST", "/users/dora/tokens", {"name": "ci"}, (201, 403, 403, 403, 401)),
    ("DELETE", "/users/dora/tokens/{token}", None, (204, 403, 403, 403, 401)),
    # Signed with the hook's secret (any bearer token, or none, is ignored).
    ("POST", "/hooks/ping", {"n": 1}, (201, 201, 201, 201, 201)),
    # Data subjects: the export reveals payloads (payload:read), erasure is admin only.
    ("GET", "/subjects/customer:1/export", None, (200, 403, 403, 403, 401)),
    ("POST", "/subjects/customer:1/erase", {"reason": "test"}, (200, 403, 403, 403, 401)),
    # The assistants (installed by the matrix test): anyone signed in may ask for approval.
    ("POST", "/approvals", APPROVAL, (201, 201, 201, 201, 401)),
    ("POST", "/messages", MESSAGE, (202, 202, 403, 403, 401)),
    ("POST", "/messages/email", None, (202, 202, 403, 403, 401)),  # the e-mail as the body
    ("POST", "/invoices", INVOICE, (201, 201, 403, 403, 401)),  # the file itself as the body
]


def test_the_matrix_covers_every_route():
    documented = {
        (method.upper(), path)
        for path, ops in server.create_app(flowdesk.App("sqlite:///:memory:"))
        .openapi()["paths"]
        .items()
        for method in ops
    }
    in_matrix = set()
    for method, template in documented:
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
        in_matrix |= {
            (m, template) for m, path, _, _ in MATRIX if m == method and pattern.match(path)
        }
    assert in_matrix == documented
    assert len(MATRIX) == len(documented)


async def test_role_endpoint_matrix(env, tmp_path):
    approvals.Approvals(env.app, Path(__file__).parents[2] / "data" / "approvals" / "policy.toml")
    support.Support(env.app, knowledge.KnowledgeBase([]), tickets.TicketDesk())
    with sqlite3.connect(tmp_path / "erp.db") as conn:
        for ddl in inv.ERP_DDL:
            conn.execute(ddl)
    erp = sql.SqlConnector("erp", env.app, f"sqlite:///{tmp_path / 'erp.db'}")
    inv.Invoices(env.app, Archive(tmp_path / "documents"), inv.Erp(erp))
    pdf = Path(__file__).parent.parent / "data" / "invoices" / "inv-2025-0012-L4-en_IE.pdf"
    await identity.Identity(env.app).create_user("dora")
    spare_run = await env.start("waiter")
    spare_task = await env.task_of(await env.start("approval", {"amount": 3}))
    counter = iter(range(1_000_000))
    # One clock reading for every signed delivery: each gets its own second below it, so
    # no two deliveries share a timestamp even when the clock ticks between them.
    signed_at = int(time.time())

    async def fresh(kind: str, who: str | None) -> str:
        if kind == "run":
            return await env.start("waiter")
        if kind == "failed":
            run_id = await env.start("broken")
            await env.wait_status(env.app, run_id, RunStatus.FAILED)
            return run_id
        if kind in ("task", "claimed"):
            task_id = await env.task_of(await env.start("approval", {"amount": 3}))
            if kind == "claimed":
                r = await env.call("POST", f"/tasks/{task_id}/claim", who)
                assert r.status_code == 200, r.text
            return task_id
        if kind == "user":
            return f"new{next(counter)}"
        assert kind == "token"
        return (await identity.Identity(env.app).create_token("dora"))[0].id

    # Refused calls never reach the resource: any existing one will do.
    spare = {"run": spare_run, "failed": spare_run, "task": spare_task, "claimed": spare_task}

    failures = []
    for method, path, body, statuses in MATRIX:
        for who, expected in zip(ROLES, statuses, strict=True):
            url, payload = path, json.loads(json.dumps(body))
            for kind in ("run", "failed", "task", "claimed", "user", "token"):
                slot = "{" + kind + "}"
                if slot in path or (payload and slot in json.dumps(payload)):
                    value = await fresh(kind, who) if expected < 300 else spare.get(kind, "x")
                    url = url.replace(slot, value)
                    if payload is not None:
                        payload = json.loads(json.dumps(payload).replace(slot, value))
            kwargs: dict[str, Any] = {} if payload is None else {"json": payload}
            if path == "/invoices":
                kwargs = {
                    "content": pdf.read_bytes(),
                    "headers": {"Content-Type": "application/pdf"},
                }
            if path == "/messages/email":
                kwargs = {
                    "content": (
                        f"From: c@example.com\r\nMessage-ID: <m{next(counter)}@example.com>\r\n"
                        "Subject: card\r\n\r\nWhere is my card?\r\n"
                    ).encode(),
                    "headers": {"Content-Type": "message/rfc822"},
                }
            if path.startswith("/hooks/"):  # a webhook: signed, with a fresh delivery id
                raw, n = json.dumps(payload).encode(), next(counter)
                stamp = signed_at - n  # a distinct signed request per delivery (same body)
                headers = webhooks.signed_headers(HOOK_SECRET, raw, f"d{n}", stamp)
                kwargs = {"content": raw, "headers": headers}
            r = await env.call(method, url, who, **kwargs)
            if r.status_code != expected:
                failures.append(f"{method} {path} as {who}: {r.status_code} != {expected} {r.text}")
            elif expected >= 400:
                want = {401: "Unauthenticated", 403: "PermissionDenied"}[expected]
                assert r.json()["error"] == want
    await erp.aclose()
    assert not failures, "\n".join(failures)


# -- audit -----------------------------------------------------------------------------------


async def test_audit_export_is_json_lines_and_the_chain_verifies(env):
    run_id = await env.start("echo", {"n": 2})
    await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)
    r = await env.call("GET", "/audit/export", "olga")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = r.text.splitlines()
    records = [json.loads(line) for line in lines]
    assert [rec["seq"] for rec in records] == list(range(1, len(records) + 1))
    assert {"user.created", "token.created", "run.started", "run.finished"} <= {
        rec["action"] for rec in records
    }
    mine = (
        await env.call("GET", "/audit/export", "olga", params={"subject": f"run:{run_id}"})
    ).text
    assert {json.loads(x)["subject"] for x in mine.splitlines()} == {f"run:{run_id}"}
    tail = (await env.call("GET", "/audit/export", "olga", params={"after_seq": 3})).text
    assert json.loads(tail.splitlines()[0])["seq"] == 4
    error(
        await env.call("GET", "/audit/export", "olga", params={"after_seq": -1}),
        422,
        "InvalidRequest",
    )

    report = (await env.call("GET", "/audit/verify", "olga")).json()
    assert report["ok"] is True and report["problems"] == [] and report["records"] >= len(records)
    r = await env.call("POST", "/audit/checkpoint", "root")
    assert r.status_code == 201
    cp = r.json()["checkpoint"]
    assert cp["seq"] >= len(records) and len(cp["signature"]) == 128
    report = (await env.call("GET", "/audit/verify", "olga")).json()
    assert report["ok"] is True and report["checkpoints"] == 1
    assert report["last_checkpoint"] == cp["seq"]


# -- the embedded worker -----------------------------------------------------------------------


async def test_create_app_with_a_worker_runs_work_and_closes_cleanly(app, tmp_path, wait_status):
    register(app)
    log = audit_log.AuditLog(app, tmp_path / "audit.key", every=1)
    api = server.create_app(app, audit=log, worker=True)
    async with api.router.lifespan_context(api):
        assert len(app.upkeep_hooks) == 1 and len(app._workers) == 1
        ids = identity.Identity(app)
        await ids.create_user("olga", roles=["operator"])
        secret = (await ids.create_token("olga"))[1]
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(
                "/runs",
                json={"workflow": "echo", "input": {"n": 21}},
                headers={"Authorization": f"Bearer {secret}"},
            )
            assert r.status_code == 201
            run = await wait_status(app, r.json()["id"], RunStatus.SUCCEEDED)
            assert run.output == 42

            async def signed() -> bool:
                return bool(await log.checkpoints())

            await asyncio.wait_for(_until(signed), 10)
    assert app.upkeep_hooks == [] and app._workers == []
    with pytest.raises(errors.StoreError):  # closed
        app.store  # noqa: B018


async def _until(predicate: Callable[[], Awaitable[bool]]) -> None:
    while not await predicate():
        await asyncio.sleep(0.05)


async def test_ready_answers_503_when_the_store_does_not(tmp_path):
    app = flowdesk.App(f"sqlite:///{tmp_path}/missing/folder/db.sqlite")
    api = server.create_app(app)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["error"] == "Unavailable"
