"""Customer messages that reach the support assistant by e-mail (``.eml`` files dropped in a
folder) and by an event stream (real Redis Streams), on both stores, with the real intent
model, tickets table and ticket service of `test_assistant_support`: each message reaches
its thread's conversation once, and what cannot be read is refused with its reason."""

# The fixtures imported from test_assistant_support are parameters of these tests.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from test_assistant_support import build, desk, models_toml, ticket_service  # noqa: F401
from test_streams import rds  # noqa: F401

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.assistants import support as sup
from flowdesk.governance import identity
from flowdesk.server import app as server
from flowdesk.triggers import redis as redis_source


def mail(
    message_id: str,
    body: str,
    *,
    subject: str = "My card",
    sender: str = "Jane Doe <jane.doe@example.com>",
    replying_to: list[str] | None = None,
    html: bool = False,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "support@bank.example"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{message_id}>"
    if replying_to:
        msg["In-Reply-To"] = f"<{replying_to[-1]}>"
        msg["References"] = " ".join(f"<{i}>" for i in replying_to)
    if html:
        msg.set_content(body, subtype="html")
    else:
        msg.set_content(body)
    return msg.as_bytes()


# -- reading an e-mail -----------------------------------------------------------------------------
def test_an_email_becomes_a_message_of_its_thread() -> None:
    first = sup.read_email(mail("a1@mail.example", "My new card has not arrived yet."))
    assert first.thread_id == "mail:a1@mail.example" and first.message_id == "a1@mail.example"
    assert first.text == "My card\nMy new card has not arrived yet."
    assert first.email == "jane.doe@example.com"
    # the customer id shows in task titles: a pseudonym, never the address
    assert first.customer.startswith("mail-") and "jane" not in first.customer
    assert sup.read_email(mail("x@y", "hi", sender="JANE.DOE@example.com ")).customer == (
        first.customer
    )

    reply = sup.read_email(
        mail(
            "a3@mail.example",
            "Still nothing, what is the exchange rate meanwhile?\n\n"
            "On Mon, 2 Nov 2026 at 10:00, Bank <support@bank.example> wrote:\n"
            "> Your card is on its way.\n",
            subject="Re: RE: My card",
            replying_to=["a1@mail.example", "a2@bank.example"],
        )
    )
    assert reply.thread_id == "mail:a1@mail.example"  # the thread's first message
    assert reply.text == "My card\nStill nothing, what is the exchange rate meanwhile?"
    quoted = sup.read_email(mail("q@m", "Thanks!\n> old text\n>> older"))
    assert quoted.text == "My card\nThanks!"

    html = sup.read_email(
        mail("h@m", "<p>Card <b>blocked</b> &amp; PIN lost</p><style>p{}</style>", html=True)
    )
    assert html.text == "My card\nCard blocked & PIN lost"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\x01 not an e-mail at all", "no sender address"),
        (mail("n@m", "text", sender="nobody"), "no sender address"),
        (
            b"From: a@b.example\r\nSubject: x\r\n\r\nhello\r\n",
            "no Message-ID, References or In-Reply-To",
        ),
        (mail("e@m", "\n  \n", subject=""), "no text"),
    ],
)
def test_what_is_not_a_customer_email_is_refused_with_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(errors.Permanent, match=reason):
        sup.read_email(raw)


# -- the same message twice is one message ----------------------------------------------------
async def test_a_message_delivered_twice_under_one_id_is_handled_once(
    app, models_toml, desk, wait_status
) -> None:
    ticket_desk, _ = desk
    support = build(app, models_toml, ticket_desk)
    try:
        async with app, app.worker(concurrency=10):
            text = "I ordered a card two weeks ago and it still has not arrived."
            run_id, started = await support.receive("t-1", "c-1", text, message_id="m-1")
            again, started_again = await support.receive("t-1", "c-1", text, message_id="m-1")
            other, _ = await support.receive("t-1", "c-1", text, message_id="m-2")
            assert started and not started_again and again == other == run_id
            done = await wait_status(app, run_id, RunStatus.SUCCEEDED)
        assert [m["intent"] for m in done.output["messages"]] == ["card_arrival"] * 2
    finally:
        await app.gateway.close()


# -- e-mail: a watched folder ----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running(watcher: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(watcher.run())
    try:
        yield
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 30)


async def test_emails_dropped_in_a_folder_reach_their_conversation_once(
    app, models_toml, desk, tmp_path, wait_until, wait_status
) -> None:
    ticket_desk, _ = desk
    support = build(app, models_toml, ticket_desk, idle=1.0)
    inbox = tmp_path / "mail"
    inbox.mkdir()
    first = mail("c1@mail.example", "My new card has not arrived yet, two weeks now.")
    (inbox / "1.eml").write_bytes(first)
    try:
        async with app, app.worker(concurrency=10):
            watcher = support.watch(inbox, interval=0.05, settle=0.0)
            async with running(watcher):
                await wait_until(lambda: (inbox / "done" / "1.eml").exists(), what="1.eml done")
                (conversation,) = await support.runs("mail:c1@mail.example")
                reply = mail(
                    "c2@mail.example",
                    "And which exchange rate do you use for card payments abroad?",
                    subject="Re: My card",
                    replying_to=["c1@mail.example"],
                )
                (inbox / "2.eml").write_bytes(reply)
                # the first e-mail again, as a mail server may deliver it twice: other bytes
                # (a header added on the way), the same Message-ID
                (inbox / "1-again.eml").write_bytes(b"X-Delivered-Again: yes\r\n" + first)
                (inbox / "junk.eml").write_bytes(b"\x00\x01 garbage")
                await wait_until(
                    lambda: (
                        len(list((inbox / "done").glob("*.eml"))) == 3
                        and (inbox / "failed" / "junk.eml").exists()
                    ),
                    what="three e-mails taken and the junk refused",
                )
                done = await wait_status(app, conversation.id, RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()
    messages = done.output["messages"]
    assert [m["intent"] for m in messages] == ["card_arrival", "exchange_rate"]
    assert done.output["customer"] == sup.mail_customer("jane.doe@example.com")
    reason = json.loads((inbox / "failed" / "junk.eml.reason.json").read_text())
    assert "no sender address" in json.dumps(reason)
    intake = (await app.list_runs(workflow=sup.EMAIL_INTAKE)).items
    assert sorted(r.status for r in intake) == sorted(
        [RunStatus.SUCCEEDED] * 3 + [RunStatus.FAILED]
    )


# -- an event stream: Redis Streams -----------------------------------------------------------
async def test_stream_messages_reach_their_conversation_and_bad_ones_are_dead_lettered(
    app: flowdesk.App, models_toml, desk, rds, wait_until, wait_status
) -> None:
    ticket_desk, _ = desk
    support = build(app, models_toml, ticket_desk, idle=1.0)
    stream = f"flowdesk-test:support:{uuid.uuid4().hex[:12]}"
    thread = f"chat-{uuid.uuid4().hex[:8]}"

    def body(text: str, **extra: Any) -> bytes:
        return json.dumps({"thread_id": thread, "customer": "c-9", "text": text, **extra}).encode()

    await rds.xadd(stream, {"data": body("My card still has not arrived after two weeks.")})
    await rds.xadd(stream, {"data": body("What exchange rate do you use abroad?")})
    bad = await rds.xadd(stream, {"data": body("hi", channel="sms")})
    consumer = redis_source.RedisStreamConsumer(
        app, workflow=sup.EVENT_INTAKE, stream=stream, group="support", poll_seconds=0.1
    )
    try:
        async with app, app.worker(concurrency=10):
            task = asyncio.create_task(consumer.run())
            try:
                await wait_until(lambda: consumer.stats.received == 3, what="3 entries")
                (conversation,) = await wait_until(lambda: support.runs(thread))
                done = await wait_status(app, conversation.id, RunStatus.SUCCEEDED)
            finally:
                consumer.stop()
                await asyncio.wait_for(task, 30)
        assert consumer.stats.started == 2 and consumer.stats.dead_lettered == 1
        # intake runs start concurrently: one thread's stream messages may swap places
        intents = sorted(m["intent"] for m in done.output["messages"])
        assert intents == ["card_arrival", "exchange_rate"]
        ((_, dead),) = await rds.xrange(f"{stream}:dead")
        assert dead[b"id"] == bad and b"channel" in dead[b"reason"]
    finally:
        await rds.delete(stream, f"{stream}:dead")
        await app.gateway.close()


# -- e-mail through the REST API -------------------------------------------------------------------
async def test_an_email_posted_to_the_api_joins_its_thread_once(
    app, models_toml, desk, tmp_path, wait_status
) -> None:
    ticket_desk, _ = desk
    build(app, models_toml, ticket_desk, idle=1.0)
    try:
        async with app, app.worker(concurrency=10):
            ids = identity.Identity(app)
            await ids.create_user("olga", roles=["operator"])
            token = (await ids.create_token("olga"))[1]
            api = server.create_app(app)
            auth = {"Authorization": f"Bearer {token}"}
            rfc822 = {**auth, "Content-Type": "message/rfc822"}
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=api), base_url="http://t"
            ) as client:
                first = mail("api1@mail.example", "My new card has not arrived yet.")
                one = await client.post("/messages/email", content=first, headers=rfc822)
                two = await client.post("/messages/email", content=first, headers=rfc822)
                assert one.status_code == two.status_code == 202, one.text
                assert one.json()["started"] and not two.json()["started"]
                assert one.json()["thread_id"] == "mail:api1@mail.example"
                wrong = await client.post(
                    "/messages/email", content=first, headers={**auth, "Content-Type": "text/plain"}
                )
                assert wrong.status_code == 415 and "message/rfc822" in wrong.json()["message"]
                junk = await client.post("/messages/email", content=b"\x00junk", headers=rfc822)
                assert junk.status_code == 422 and "no sender" in junk.json()["message"]
                done = await wait_status(app, one.json()["run_id"], RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()
    assert [m["intent"] for m in done.output["messages"]] == ["card_arrival"]
