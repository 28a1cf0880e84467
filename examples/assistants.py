"""The reference assistants in the demo: approvals (a policy and people decide requests),
support triage (a local intent model answers, files tickets or asks a person) and invoices
(examples/invoice_demo.py: sample invoices from a watched folder into an ERP ledger).

`install` registers both on an app: the approvals policy from data/approvals/policy.toml,
a support intent model trained once on Banking77 (TF-IDF, a few seconds; kept in
./flowdesk-models/), the knowledge base in data/support/, and tickets written to the SQL
table ``tickets`` of ./tickets.db through the SQL connector. Customer e-mails (``.eml``)
dropped in ./support-mail/ reach the support assistant too; two samples, a question and
its follow-up, are dropped there at first start. `feed` sends sample requests and
messages; `answer` plays the people who decide what lands in the inbox.
"""

from __future__ import annotations

import asyncio
import csv
import random
import sqlite3
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import flowdesk
from flowdesk.assistants import approvals as appr
from flowdesk.assistants import knowledge as kb
from flowdesk.assistants import support as sup
from flowdesk.assistants import tickets as tk
from flowdesk.connectors import sql
from flowdesk.humans.inbox import Inbox
from flowdesk.models import registry, training
from flowdesk.models.gateway import Gateway
from flowdesk.store.people import Person

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path("flowdesk-models")
TASK = "support_intent"
MAIL = Path("support-mail")
SAMPLE_MAILS = [
    (
        "1-card.eml",
        "From: Jo Customer <jo@example.com>\r\nTo: support@bank.example\r\n"
        "Subject: My card\r\nMessage-ID: <demo-card-1@mail.example>\r\n\r\n"
        "I ordered a new card two weeks ago and it still has not arrived.\r\n",
    ),
    (
        "2-card-reply.eml",
        "From: Jo Customer <jo@example.com>\r\nTo: support@bank.example\r\n"
        "Subject: Re: My card\r\nMessage-ID: <demo-card-2@mail.example>\r\n"
        "In-Reply-To: <demo-card-1@mail.example>\r\n"
        "References: <demo-card-1@mail.example>\r\n\r\n"
        "Thanks. Which exchange rate do you use when I pay abroad with it?\r\n\r\n"
        "On Monday, Bank Support wrote:\r\n> Your card is on its way.\r\n",
    ),
]

# (user, roles, groups): the approvers the policy names, and the support desk.
PEOPLE = [
    ("anna", ["approver"], ["managers"]),
    ("bob", ["approver"], ["managers"]),
    ("carl", ["approver"], ["managers"]),
    ("fiona", ["approver"], ["finance"]),
    ("owen", ["approver"], ["finance"]),
    ("cfo", ["approver"], ["finance"]),
    ("sam", ["approver"], ["support"]),
    ("lead", ["approver"], ["support"]),
]
REQUESTERS = ["erin", "frank", "gina"]


def _messages() -> list[str]:
    with (ROOT / "data" / "banking77" / "train.csv").open(encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def _train_intents() -> Path:
    """The support intent model and the gateway config that serves it (trained once)."""
    config = MODELS / "support.toml"
    if config.exists():
        return config
    examples = training.load_examples(
        ROOT / "data" / "banking77" / "train.csv", label_column="category"
    )
    result = training.train(examples, features="tfidf")
    registry.Registry(MODELS).register(TASK, result.classifier, result.meta)
    labels = ", ".join(f'"{label}"' for label in sorted(set(examples.labels)))
    config.write_text(
        f'[providers.local]\ntype = "local"\ntask = "{TASK}"\nmodels_dir = "{MODELS}"\n\n'
        f'[models.intent]\nprovider = "local"\nmodel = "{TASK}"\n'
        'capabilities = ["classify"]\n\n'
        f'[tasks.{TASK}]\ncapability = "classify"\nlabels = [{labels}]\n'
        'chain = ["intent"]\nconfidence_threshold = 0.3\n',
        encoding="utf-8",
    )
    return config


def _tickets_db() -> Path:
    db = Path("tickets.db")
    with sqlite3.connect(db) as conn:
        conn.execute(tk.TICKETS_DDL)
    return db


async def install(app: flowdesk.App, stack: AsyncExitStack) -> tuple[Any, Any]:
    """Register both assistants on ``app``; connectors close with ``stack``."""
    identity_users = {u.id for u in await app.store.list_users()}
    from flowdesk.governance.identity import Identity

    identity = Identity(app)
    for user, roles, groups in PEOPLE:
        if user not in identity_users:
            await identity.create_user(user, roles=roles, groups=groups)
    import invoice_demo  # examples/invoice_demo.py: the invoice assistant on a watched folder

    config = await asyncio.to_thread(_train_intents)
    config = await asyncio.to_thread(invoice_demo.models_config, config)
    app.gateway = Gateway.from_toml(config)
    approvals = appr.Approvals(app, ROOT / "data" / "approvals" / "policy.toml")
    db = await asyncio.to_thread(_tickets_db)
    database = await stack.enter_async_context(
        sql.SqlConnector("tickets-db", app, f"sqlite:///{db.resolve()}")
    )
    support = sup.Support(
        app,
        kb.KnowledgeBase.from_folder(ROOT / "data" / "support"),
        tk.TicketDesk(database),
        agent_groups=["support"],
        escalate_to=["lead"],
    )
    await _watch_mail(support, stack)
    await invoice_demo.install(app, stack)
    return approvals, support


def _drop_mails() -> int:
    """The sample e-mails, once (written under a .part name, then renamed)."""
    MAIL.mkdir(exist_ok=True)
    if (MAIL / "done").exists():
        return 0
    for name, text in SAMPLE_MAILS:
        part = MAIL / (name + ".part")
        part.write_bytes(text.encode())
        part.rename(MAIL / name)
    return len(SAMPLE_MAILS)


async def _watch_mail(support: sup.Support, stack: AsyncExitStack) -> None:
    dropped = await asyncio.to_thread(_drop_mails)
    import invoice_demo  # examples/invoice_demo.py

    invoice_demo.keep_watching(support.watch(MAIL, interval=1.0, settle=0.5), stack)
    print(f"support assistant: e-mails (.eml) in {MAIL}/ ({dropped} samples dropped in)")


async def feed(approvals: Any, support: Any, n: int) -> None:
    """One approval request and one customer message (every few ticks)."""
    messages = _messages()
    if n % 3 == 0:
        amount = round(random.choice([80, 450, 900, 2500, 12000, 30000]) * random.random(), 2)
        await approvals.submit(
            appr.ApprovalRequest(
                type=random.choice(["purchase", "access", "expense"]),
                amount=amount,
                currency="EUR",
                cost_centre=random.choice(["CC-100", "CC-200"]),
                requester=random.choice(REQUESTERS),
                justification="demo request",
                vendor=random.choice(["Acme GmbH", "Paper & Co", "Shady Supplies Ltd"]),
            )
        )
    thread = f"T{n // 2:05d}"  # two messages per thread: the second is a follow-up
    await support.receive(thread, f"customer-{n // 2}", random.choice(messages))


async def answer(inbox: Inbox) -> None:
    """The people: each open approval or support review gets a decision."""
    page = await inbox.tasks(None, status=["open", "claimed"], limit=50)
    for task in page.items:
        if task.created_at > datetime.now(UTC) - timedelta(seconds=20):
            continue  # the newest stay in the web inbox for a while
        if task.kind == "approval":
            person = Person(task.assignee or (task.users or ["anna"])[0])
            data: dict[str, Any] = {"approve": random.random() < 0.85, "comment": "demo"}
        elif task.kind == "support.review":
            person = Person(task.assignee or "sam", groups=("support",))
            data = {"action": "ticket", "reply": ""}
        else:
            continue
        if person.id == task.initiator:
            continue
        try:
            await inbox.complete(task.id, person, data)
        except flowdesk.FlowdeskError as exc:
            print(f"  {person.id} could not complete {task.id}: {exc}")
            continue
        print(f"  {person.id} completed {task.kind}: {task.title}")
