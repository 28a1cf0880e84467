"""A small order-fulfilment app: charge, ask a person to approve big orders, ship in a
child workflow.

``python examples/orders.py`` (what ``make run`` does) serves the REST API and the web UI
on http://127.0.0.1:8000 with an embedded worker, feeds it sample orders, and plays a demo
approver who answers the approval tasks in the inbox once they are 20 seconds old (so the
newest wait in the web inbox for you). It creates users on first start (``admin``, ``omar``
the operator, ``dana`` the approver; every demo person's web password is
``DEMO_PASSWORD``) and writes an admin API token to ``.flowdesk-admin-token``::

    curl -H "Authorization: Bearer $(cat .flowdesk-admin-token)" localhost:8000/tasks

or point the CLI at it from another terminal::

    flowdesk runs list
    flowdesk tasks list --user dana
    flowdesk audit verify
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel, Field

import flowdesk
from flowdesk.documents.archive import Archive
from flowdesk.governance.audit import AuditLog
from flowdesk.governance.identity import Identity
from flowdesk.humans.inbox import Inbox
from flowdesk.server.app import create_app
from flowdesk.store import audit

app = flowdesk.App()


@app.step(retries=3, backoff=2.0, retry_delay=0.2, timeout=30)
async def charge(order_id: str, amount: float) -> dict[str, object]:
    """Charge the customer (a payment API in real life; it fails now and then)."""
    if random.random() < 0.1:
        raise ConnectionError("payment gateway timed out")
    key = flowdesk.current_step().idempotency_key  # type: ignore[union-attr]
    return {"order_id": order_id, "amount": amount, "charge_id": f"ch_{key[-12:]}"}


@app.step
def reserve_stock(order_id: str, items: int) -> bool:
    """A blocking call (runs in the thread pool)."""
    return items <= 5


@app.step
async def book_courier(order_id: str) -> str:
    return f"TRK-{order_id}-{random.randint(1000, 9999)}"


@app.workflow("orders.ship")
async def ship(ctx: flowdesk.Context, order_id: str) -> str:
    return await ctx.step(book_courier, order_id)


class OrderApproval(BaseModel):
    """The form the approver fills in."""

    approved: bool
    note: str = Field(default="", max_length=500)


@app.workflow("orders.fulfil")
async def fulfil(
    ctx: flowdesk.Context, order_id: str, amount: float = 10.0, items: int = 1
) -> dict[str, object]:
    if not await ctx.step(reserve_stock, order_id, items):
        return {"order_id": order_id, "status": "out of stock"}
    receipt = await ctx.step(charge, order_id, amount)
    if amount > 100:
        # Large orders wait for a person in the finance group (not the one who asked).
        decision = await ctx.human_task(
            "order-approval",
            title=f"Approve order {order_id} for {amount:.2f} EUR",
            form=OrderApproval,
            context={"order_id": order_id, "amount": amount, "charge": receipt},
            candidates=flowdesk.Assignees(groups=["finance"]),
            due=timedelta(minutes=10),
            escalation=[
                flowdesk.Escalation.notify(reason="still waiting for finance"),
                flowdesk.Escalation.auto_decide(
                    OrderApproval(approved=False, note="no decision in time"),
                    after=timedelta(hours=1),
                    reason="not approved within an hour of its due time",
                ),
            ],
            four_eyes=True,
        )
        if not decision.approved:
            return {"order_id": order_id, "status": "rejected", "note": decision.note}
    await ctx.sleep(timedelta(seconds=1))  # a durable pause: survives restarts
    tracking = await ctx.child("orders.ship", {"order_id": order_id})
    return {"order_id": order_id, "status": "shipped", "receipt": receipt, "tracking": tracking}


TOKEN_FILE = Path(".flowdesk-admin-token")
DEMO_PASSWORD = os.environ.get("FLOWDESK_DEMO_PASSWORD", "flowdesk-demo")
LEAVE_FOR_PEOPLE = timedelta(seconds=20)  # the demo approver answers older tasks only


async def bootstrap() -> None:
    """Users for the demo, and an admin token on disk (first start only)."""
    identity = Identity(app)
    known = {u.id for u in await identity.list_users()}
    for user, roles, groups in (
        ("admin", ["admin"], []),
        ("omar", ["operator"], ["ops"]),
        ("dana", ["approver"], ["finance"]),
    ):
        if user not in known:
            await identity.create_user(user, roles=roles, groups=groups)
    if not _token_saved():
        _, secret = await identity.create_token("admin", name="demo")
        _save_token(secret)


def _token_saved() -> bool:
    return TOKEN_FILE.exists()


def _save_token(secret: str) -> None:
    fd = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


async def feed(stop: asyncio.Event, helpers: Any) -> None:
    """Sample orders, started by omar; dana answers the approval tasks a moment later.
    With the assistants: approval requests and customer messages, and their people."""
    dana = (await Identity(app).get_user("dana")).person()
    inbox = Inbox(app)
    n = 0
    while not stop.is_set():
        n += 1
        if helpers is not None:
            module, approvals, support = helpers
            try:
                await module.feed(approvals, support, n)
                await module.answer(inbox)
            except flowdesk.FlowdeskError as exc:
                print(f"  assistant sample failed: {exc}")
        amount = round(random.uniform(5, 150), 2)
        token = audit.ACTOR.set("omar")  # as if omar called the API
        try:
            await app.start(
                "orders.fulfil",
                {"order_id": f"O{n:05d}", "amount": amount, "items": n % 7},
                idempotency_key=f"demo-{random.getrandbits(64):x}",
            )
        finally:
            audit.ACTOR.reset(token)
        for task in (await inbox.tasks(dana, status=["open"], limit=20)).items:
            if task.created_at > datetime.now(UTC) - LEAVE_FOR_PEOPLE:
                continue
            approve = random.random() < 0.8
            note = "fine" if approve else "too expensive"
            await inbox.complete(task.id, dana, {"approved": approve, "note": note})
            print(f"  dana {'approved' if approve else 'rejected'} {task.title}")
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


async def demo() -> None:
    """The API server with an embedded worker, plus the sample feed, until Ctrl-C."""
    await bootstrap()
    async with contextlib.AsyncExitStack() as stack:
        helpers = None
        if os.environ.get("FLOWDESK_DEMO_ASSISTANTS", "1") != "0":
            import assistants  # examples/assistants.py: the approvals and support assistants

            print(
                "installing the approvals, support and invoice assistants "
                "(first start trains their models)"
            )
            approvals, support = await assistants.install(app, stack)
            helpers = (assistants, approvals, support)
        await _serve(helpers)


async def _serve(helpers: Any) -> None:
    identity = Identity(app)
    for user in await identity.list_users():  # every demo person signs in to the web UI
        if await app.store.password_hash(user.id) is None:
            await identity.set_password(user.id, DEMO_PASSWORD)
    api = create_app(
        app,
        audit=AuditLog(app, every=500),
        worker=True,
        documents=Archive("flowdesk-documents"),  # the invoice assistant's (invoice_demo.py)
    )
    port = int(os.environ.get("FLOWDESK_PORT", "8000"))
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    stop = asyncio.Event()
    print(f"flowdesk on {app.database_url}: API on http://127.0.0.1:{port} (docs at /docs)")
    print(f"web UI on http://127.0.0.1:{port}: sign in as dana (the demo approver), paula")
    print(f"  (invoice reviews) or omar (the demo operator), password {DEMO_PASSWORD!r}")
    print(f"admin API token in {TOKEN_FILE}; Ctrl-C stops")
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    feeder = asyncio.create_task(feed(stop, helpers))
    try:
        await serving  # uvicorn stops on Ctrl-C / SIGTERM and shuts the worker down
    finally:
        stop.set()
        feeder.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(demo())
    except KeyboardInterrupt:
        print("stopped; the database keeps every run: flowdesk runs list")
