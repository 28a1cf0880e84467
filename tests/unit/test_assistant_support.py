"""The support-triage assistant (`flowdesk.assistants.support`) on both stores, with a real
local classifier (TF-IDF, trained in the test on a slice of Banking77) behind the model
gateway, a real SQL ``tickets`` table (SQLite file, through the SQL connector), a real
ticketing HTTP service (Starlette under uvicorn on a free port) and the REST API in
process: redaction, intent and out-of-scope, sentiment and priority, the three outcomes,
follow-ups on a thread, SLA escalation and idempotent tickets."""

from __future__ import annotations

import csv
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpserver import serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import flowdesk
from flowdesk import RunStatus
from flowdesk.assistants import knowledge as kb
from flowdesk.assistants import support as sup
from flowdesk.assistants import tickets as tk
from flowdesk.connectors import base, rest, sql
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.humans.inbox import Inbox
from flowdesk.models import registry, training
from flowdesk.models.gateway import Gateway
from flowdesk.server import app as server
from flowdesk.store.people import Person

ROOT = Path(__file__).parents[2]
INTENTS = [
    "card_arrival",
    "lost_or_stolen_card",
    "change_pin",
    "exchange_rate",
    "top_up_failed",
    "transfer_not_received_by_recipient",
    "Refund_not_showing_up",
]
OUT_OF_SCOPE = ["age_limit", "apple_pay_or_google_pay", "country_support", "terminate_account"]
PER_LABEL = 60


# -- a real ticketing service ------------------------------------------------------------------
TICKETS: dict[str, dict[str, Any]] = {}
REQUESTS: list[str] = []


async def create_ticket(request: Request) -> JSONResponse:
    key = request.headers["Idempotency-Key"]
    REQUESTS.append(key)
    if key not in TICKETS:
        TICKETS[key] = {"id": f"T-{len(TICKETS) + 1}", **(await request.json())}
    return JSONResponse(TICKETS[key], status_code=201)


@pytest.fixture(scope="module")
def ticket_service() -> Iterator[str]:
    api = Starlette(routes=[Route("/tickets", create_ticket, methods=["POST"])])
    with serving(api, "ticket-service") as url:
        yield url


# -- a tiny intent model behind the gateway ------------------------------------------------------
@pytest.fixture(scope="module")
def models_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("support-models")
    by_label: dict[str, list[str]] = defaultdict(list)
    with (ROOT / "data" / "banking77" / "train.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row["text"])
    texts, labels = [], []
    for intent in INTENTS:
        texts += by_label[intent][:PER_LABEL]
        labels += [intent] * PER_LABEL
    for other in OUT_OF_SCOPE:
        texts += by_label[other][: PER_LABEL // 2]
        labels += ["out_of_scope"] * (PER_LABEL // 2)
    examples = training.Examples(
        texts=tuple(texts),
        labels=tuple(labels),
        path="banking77-slice",
        sha256="-",
        format="csv",
        text_column="text",
        label_column="category",
    )
    result = training.train(examples, features="tfidf", out_of_scope_label="out_of_scope")
    registry.Registry(folder / "models").register("support_intent", result.classifier)
    labels_toml = ", ".join(f'"{x}"' for x in [*INTENTS, "out_of_scope"])
    config = folder / "models.toml"
    config.write_text(
        f'[providers.local]\ntype = "local"\ntask = "support_intent"\n'
        f'models_dir = "{folder / "models"}"\n\n'
        '[models.intent]\nprovider = "local"\nmodel = "support_intent"\n'
        'capabilities = ["classify"]\n\n'
        f'[tasks.support_intent]\ncapability = "classify"\nlabels = [{labels_toml}]\n'
        'chain = ["intent"]\nconfidence_threshold = 0.25\n'
    )
    return config


@pytest.fixture
async def desk(
    tmp_path: Path, ticket_service: str, app: flowdesk.App
) -> AsyncIterator[tuple[tk.TicketDesk, Path]]:
    TICKETS.clear()
    REQUESTS.clear()
    db = tmp_path / "tickets.db"
    with sqlite3.connect(db) as conn:
        conn.execute(tk.TICKETS_DDL)
    retry = base.TransportRetry(retries=2, delay=0.01)
    async with (
        sql.SqlConnector("tickets-db", app, f"sqlite:///{db}", retry=retry) as database,
        rest.RestConnector("tickets-api", app, ticket_service, retry=retry) as service,
    ):
        yield tk.TicketDesk(database, service), db


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT idempotency_key, thread_id, intent, priority, text FROM tickets ORDER BY 1"
        ).fetchall()


def build(app: flowdesk.App, models_toml: Path, desk: tk.TicketDesk, **kw: Any) -> sup.Support:
    app.gateway = Gateway.from_toml(models_toml)
    kw.setdefault("idle", 0.5)
    return sup.Support(app, kb.KnowledgeBase.from_folder(ROOT / "data" / "support"), desk, **kw)


# -- pure parts -----------------------------------------------------------------------------------
def test_knowledge_base_finds_and_cites_the_right_article() -> None:
    base_ = kb.KnowledgeBase.from_folder(ROOT / "data" / "support")
    assert len(base_.articles) >= 5
    assert base_.search("my new card has not arrived yet, delivery")[0].id == "card-delivery"
    assert base_.search("PIN blocked after three wrong entries")[0].id == "pin"
    assert base_.search("zebra quantum") == []


def test_sentiment_and_priority_from_word_lists() -> None:
    assert sup.sentiment("This is terrible, the worst service") == "negative"
    assert sup.sentiment("Thanks, great help") == "positive"
    assert sup.sentiment("not bad at all") == "positive"
    assert sup.sentiment("Where is my card?") == "neutral"
    assert sup.priority("my card was stolen", "card_arrival", "neutral") == "high"
    assert sup.priority("hello", "lost_or_stolen_card", "neutral") == "high"
    assert sup.priority("awful", "card_arrival", "negative") == "medium"
    assert sup.priority("hello", "card_arrival", "neutral") == "low"


# -- 1 + 3: a message through the API to each outcome; a follow-up joins the conversation ---
async def test_messages_through_the_api_answer_file_or_escalate(
    app, models_toml, desk, tmp_path, wait_until, wait_status
) -> None:
    ticket_desk, db = desk
    build(app, models_toml, ticket_desk, agents=["sam"], agent_groups=[])
    inbox = Inbox(app)
    try:
        async with app:
            ids = identity.Identity(app)
            await ids.create_user("olga", roles=["operator"])
            await ids.create_user("sam", roles=["approver"])
            token = (await ids.create_token("olga"))[1]
            sam_token = (await ids.create_token("sam"))[1]
            api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=api), base_url="http://t"
                ) as client,
                app.worker(concurrency=20),
            ):

                async def post(thread: str, text: str) -> dict[str, Any]:
                    r = await client.post(
                        "/messages",
                        headers=headers,
                        json={"thread_id": thread, "customer": "cust-1", "text": text},
                    )
                    assert r.status_code == 202, r.text
                    body: dict[str, Any] = r.json()
                    return body

                first = await post(
                    "th-1",
                    "I ordered a card two weeks ago and it still has not arrived. "
                    "Mail me at jane.doe@example.com",
                )
                follow = await post(
                    "th-1",
                    "Thanks, and what is the exchange rate you use for card payments abroad?",
                )
                assert first["started"] and not follow["started"]
                assert follow["run_id"] == first["run_id"]
                done = await wait_status(app, first["run_id"], RunStatus.SUCCEEDED)
                # out of scope -> a person, with the suggestion and its confidence
                oos = await post("th-2", "How old do I need to be to open an account with you?")
                (task,) = (await wait_until(lambda: _open(inbox), what="review task")).items
                assert task.context["out_of_scope"] and "confidence" in task.context
                assert task.context["why"] == "out of scope"
                # the person decides through the REST API, as the inbox UI does
                decided = await client.post(
                    f"/tasks/{task.id}/complete",
                    headers={"Authorization": f"Bearer {sam_token}"},
                    json={"data": {"action": "ticket"}},
                )
                assert decided.status_code == 200, decided.text
                escalated = await wait_status(app, oos["run_id"], RunStatus.SUCCEEDED)
                metrics = (await client.get("/metrics")).text
        # the business metrics the assistant declares
        assert 'support_messages_total{outcome="answered",priority="low"} 2.0' in metrics
        assert 'support_time_to_resolution_seconds_count{outcome="escalated"} 1.0' in metrics
        msgs = done.output["messages"]
        assert [m["intent"] for m in msgs] == ["card_arrival", "exchange_rate"]
        assert msgs[0]["redactions"] == {"email": 1} and "jane.doe" not in msgs[0]["text"]
        assert msgs[0]["outcome"] == "answered"
        assert msgs[0]["reply"]["citations"][0] == "card-delivery"
        assert msgs[1]["reply"]["citations"][0] == "exchange-rates"
        assert msgs[1]["sentiment"] == "positive" and msgs[1]["priority"] == "low"
        (m,) = escalated.output["messages"]
        assert (m["outcome"], m["out_of_scope"], m["review"]["action"]) == (
            "escalated",
            True,
            "ticket",
        )
        key = m["ticket"]["idempotency_key"]
        assert m["ticket"]["table"] == {"table": "tickets", "inserted": True}
        assert rows(db) == [(key, "th-2", m["intent"], m["priority"], m["text"])]
        assert (
            TICKETS[key]["thread_id"] == "th-2"
            and m["ticket"]["service"]["id"] == TICKETS[key]["id"]
        )
    finally:
        assert app.gateway is not None
        await app.gateway.close()  # type: ignore[attr-defined]


async def _open(inbox: Inbox) -> Any:
    page = await inbox.tasks(status=["open", "claimed"])
    return page if page.items else None


# -- 3: SLA by priority, with escalation ----------------------------------------------------------
async def test_a_high_priority_message_escalates_when_its_sla_passes(
    app, models_toml, desk, wait_until, wait_status
) -> None:
    ticket_desk, _ = desk
    support = build(
        app,
        models_toml,
        ticket_desk,
        agents=["sam"],
        agent_groups=[],
        escalate_to=["lead"],
        sla={"high": 0.3},
    )
    inbox = Inbox(app)
    try:
        async with app, app.worker():
            run_id, _ = await support.receive(
                "th-9", "cust-2", "URGENT my card was stolen, block it immediately"
            )
            page = await wait_until(lambda: _open(inbox), what="review task")
            (task,) = page.items
            assert task.context["priority"] == "high" and task.priority == 2

            async def moved() -> Any:
                t = await inbox.get(task.id)
                return t if t.escalation_level >= 1 else None

            t = await wait_until(moved, what="escalated to the lead")
            assert "lead" in t.users
            await inbox.complete(
                task.id, Person(id="lead"), {"action": "answer", "reply": "Card frozen."}
            )
            run = await wait_status(app, run_id, RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()  # type: ignore[union-attr]
    (m,) = run.output["messages"]
    assert (m["outcome"], m["why"], m["review"]["reply"]) == (
        "escalated",
        "high priority",
        "Card frozen.",
    )


# -- 4: tickets are idempotent per step key --------------------------------------------------------
async def test_a_ticket_filed_twice_under_one_key_is_one_row_and_one_ticket(desk) -> None:
    ticket_desk, db = desk
    row = tk.TicketRow(
        thread_id="th-5",
        customer="c",
        intent="top_up_failed",
        priority="low",
        sentiment="neutral",
        text="top up failed",
    )
    first = await ticket_desk.create(row, "run-x:7")
    again = await ticket_desk.create(row, "run-x:7")
    assert first["table"]["inserted"] and not again["table"]["inserted"]
    assert first["service"] == again["service"]
    assert [r[0] for r in rows(db)] == ["run-x:7"]
    assert REQUESTS.count("run-x:7") == 2 and TICKETS["run-x:7"]["intent"] == "top_up_failed"


# -- the gateway's confidence threshold: below it on every model, a person decides ----------------
async def test_an_answer_below_the_tasks_confidence_threshold_goes_to_a_person(
    app, models_toml, desk, tmp_path, wait_until, wait_status
) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text(
        models_toml.read_text().replace("confidence_threshold = 0.25", "confidence_threshold = 1.0")
    )
    ticket_desk, _ = desk
    support = build(app, strict, ticket_desk, agents=["sam"], agent_groups=[])
    inbox = Inbox(app)
    try:
        async with app, app.worker():
            run_id, _ = await support.receive(
                "th-12", "cust-3", "I ordered a card two weeks ago and it still has not arrived"
            )
            (task,) = (await wait_until(lambda: _open(inbox), what="review task")).items
            assert task.context["why"] == "low model confidence"
            assert task.context["intent"] == "card_arrival" and not task.context["out_of_scope"]
            assert 0.2 < task.context["confidence"] < 1.0  # the suggestion and how sure it is
            await inbox.complete(task.id, Person(id="sam"), {"action": "close"})
            run = await wait_status(app, run_id, RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()  # type: ignore[union-attr]
    (m,) = run.output["messages"]
    assert (m["outcome"], m["why"]) == ("escalated", "low model confidence")
