"""The customer support chat (`flowdesk.server.ui.chat`) over HTTP, on both stores: opening
a conversation, a knowledge-base answer with citations, asking for a person and the agent's
reply from the inbox, a ticket on request, polling, bad tokens and forms, and a restarted
server rebuilding the same transcript from the durable runs.

The support assistant is the real one (`test_assistant_support`'s intent classifier,
knowledge base and ticket desk)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_assistant_support import build, desk, models_toml, ticket_service  # noqa: F401 (fixtures)

import flowdesk
from flowdesk.assistants import chat as chat_mod
from flowdesk.assistants import support as sup
from flowdesk.governance import audit as audit_log
from flowdesk.humans.inbox import Inbox
from flowdesk.server import app as server
from flowdesk.server.ui import chat as chat_ui
from flowdesk.store.people import Person


def test_asks_for_a_person_or_a_ticket_from_word_lists() -> None:
    assert sup.asks_for("Can I talk to a human please?") == "person"
    assert sup.asks_for("I want a real person") == "person"
    assert sup.asks_for("please open a ticket") == "ticket"
    assert sup.asks_for("my card has not arrived") is None
    assert sup.asks_for("Agent!") == "person" and sup.asks_for("I need to speak to someone")
    assert sup.asks_for("I want to make a complaint") == "ticket"
    # a person or a ticket mentioned, not asked for
    assert sup.asks_for("I sent money to a person and it has not arrived") is None
    assert sup.asks_for("Why do people pay a fee? My travel agent did") is None
    assert sup.asks_for("The concert ticket was charged twice") is None


def test_tokens_name_threads_by_a_one_way_hash() -> None:
    token = chat_mod.new_token()
    thread = chat_mod.thread_of(token)
    assert thread is not None and token not in thread
    assert chat_mod.thread_of(token) == thread
    assert chat_mod.thread_of(chat_mod.new_token()) != thread
    assert chat_mod.thread_of("short") is None and chat_mod.thread_of("a/" * 16) is None


def _form_token(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "the chat page has no form token"
    return found.group(1)


async def test_a_chat_answers_hands_over_to_a_person_and_survives_a_restart(
    app,
    db_url,
    models_toml,  # noqa: F811 (the fixture)
    desk,  # noqa: F811 (the fixture)
    tmp_path: Path,
    wait_until,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ticket_desk, _ = desk

    def serve(app: flowdesk.App) -> Any:
        build(app, models_toml, ticket_desk, agents=["sam"], agent_groups=[], idle=3600)
        api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t")

    inbox = Inbox(app)
    try:
        async with app, serve(app) as client, app.worker(concurrency=10):
            page = await client.get("/chat/")
            assert page.status_code == 200 and "Start a conversation" in page.text
            started = await client.post("/chat/start")
            assert started.status_code == 303 and started.headers["location"] == "/chat/"
            cookie = started.headers["set-cookie"]
            assert "HttpOnly" in cookie and "Path=/chat" in cookie
            assert "samesite=strict" in cookie.lower()
            token = started.cookies[chat_ui.COOKIE]
            assert chat_mod.TOKEN.match(token)
            jar = {"Cookie": f"{chat_ui.COOKIE}={token}"}

            page = await client.get("/chat/", headers=jar)
            assert page.status_code == 200 and "Write your question below" in page.text
            csrf = _form_token(page.text)

            async def say(text: str, htmx: bool = False) -> httpx.Response:
                headers = {**jar, "HX-Request": "true"} if htmx else jar
                return await client.post(
                    "/chat/messages", headers=headers, data={"csrf": csrf, "text": text}
                )

            async def transcript(when: Any, what: str) -> dict[str, Any]:
                async def check() -> dict[str, Any] | None:
                    r = await client.get("/chat/transcript.json", headers=jar)
                    assert r.status_code == 200, r.text
                    body: dict[str, Any] = r.json()
                    return body if when(body) else None

                found: dict[str, Any] = await wait_until(check, what=what, interval=0.05)
                return found

            # a question the knowledge base answers, with its sources
            sent = await say("I ordered a card two weeks ago and it still has not arrived")
            assert sent.status_code == 303
            body = await transcript(
                lambda b: b["state"] == "ready" and len(b["entries"]) == 2, "the answer"
            )
            you, answer = body["entries"]
            assert you == {
                "who": "customer",
                "text": "I ordered a card two weeks ago and it still has not arrived",
                "citations": [],
                "ticket": None,
                "drafted": False,
            }
            assert answer["who"] == "assistant" and answer["citations"][0]["id"] == "card-delivery"
            assert answer["citations"][0]["title"] and answer["text"]
            assert not answer["drafted"]  # no draft_task: the article's own words
            # polling: nothing new, no body
            fragment = await client.get("/chat/transcript", headers=jar)
            assert fragment.status_code == 200 and 'class="msg msg-assistant"' in fragment.text
            same = await client.get(
                "/chat/transcript", headers=jar, params={"since": body["version"]}
            )
            assert same.status_code == 204

            # asking for a person (with an e-mail address, which is redacted): handed over
            sent = await say("Can I talk to a human? Write to jane.doe@example.com", htmx=True)
            assert sent.status_code == 200 and 'id="transcript"' in sent.text
            body = await transcript(lambda b: b["state"] == "with_person", "the hand-over")
            assert "jane.doe" not in str(body) and body["entries"][-1]["who"] == "system"
            assert "as you asked" in body["entries"][-1]["text"]
            task = (await inbox.tasks(status=["open"])).items[0]
            assert task.context["why"] == "customer asked for a person"
            assert token not in str(task.context) and token not in task.title

            # the agent replies from the inbox: the reply appears in the chat
            await inbox.complete(
                task.id,
                Person(id="sam"),
                {"action": "answer", "reply": "Hello, this is Sam. I have reissued your card."},
            )
            body = await transcript(
                lambda b: b["state"] == "ready" and b["entries"][-1]["who"] == "agent",
                "the agent's reply",
            )
            assert body["entries"][-1]["text"] == "Hello, this is Sam. I have reissued your card."

            # a ticket on request
            await say("Please open a ticket about my refund")
            body = await transcript(
                lambda b: b["state"] == "ready" and b["entries"][-1].get("ticket"), "a ticket"
            )
            assert body["entries"][-1]["who"] == "assistant"

            # bad input: an empty message, a form from elsewhere, wrong and malformed tokens
            empty = await say("   ")
            assert empty.status_code == 422 and "1 to 4000 characters" in empty.text
            forged = await client.post(
                "/chat/messages", headers=jar, data={"csrf": "0" * 32, "text": "hi"}
            )
            assert forged.status_code == 403
            for wrong in (chat_mod.new_token(), "not-a-token"):
                other = {"Cookie": f"{chat_ui.COOKIE}={wrong}"}
                lost = await client.get("/chat/", headers=other)
                assert lost.status_code == 404 and "Conversation not found" in lost.text
                assert "Start a new conversation" in lost.text
                assert 'flowdesk_chat=""' in lost.headers["set-cookie"]  # forgotten
                as_json = await client.get("/chat/transcript.json", headers=other)
                assert as_json.status_code == 404 and as_json.json()["error"] == "ChatNotFound"
                posted = await client.post(
                    "/chat/messages", headers=other, data={"csrf": csrf, "text": "hi"}
                )
                assert posted.status_code == 404
            for path in ("/chat/transcript", "/chat/transcript.json"):  # no cookie at all
                assert (await client.get(path)).status_code == 404
            before = (await client.get("/chat/transcript.json", headers=jar)).json()
    finally:
        await app.gateway.close()  # type: ignore[union-attr]

    # a restarted server (a new process's App on the same database) shows the same chat
    again = flowdesk.App(db_url, poll_interval=0.05)
    try:
        async with again, serve(again) as client:
            after = await client.get("/chat/transcript.json", headers=jar)
            assert after.status_code == 200 and after.json() == before
            assert [e["who"] for e in before["entries"]] == [
                "customer",
                "assistant",
                "customer",
                "system",
                "agent",
                "customer",
                "assistant",
            ]
    finally:
        await again.gateway.close()  # type: ignore[union-attr]
    # no personal data and no chat token in any log line (at DEBUG level, every logger)
    assert caplog.records and "jane.doe" not in caplog.text and token not in caplog.text


async def test_the_chat_is_404_without_the_support_assistant(app, tmp_path: Path) -> None:
    api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
    async with (
        app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client,
    ):
        page = await client.get("/chat/")
        assert page.status_code == 404 and "support" in page.text
        assert (await client.post("/chat/start")).status_code == 404


DRAFTING = """
[providers.llm]
type = "llama_cpp"
retries = 0

[models.smollm2]
provider = "llm"
model = "smollm2-135m-instruct"
capabilities = ["generate"]

[tasks.support_reply]
capability = "generate"
chain = ["smollm2"]
max_tokens = 40
max_answer_chars = 2000
answer_timeout_s = 60
"""


def drafting_config(base_config: Path, folder: Path) -> Path:
    """The support test's models config plus the packaged local language model, which
    drafts replies for the task ``support_reply``."""
    config = folder / "drafting.toml"
    config.write_text(base_config.read_text() + DRAFTING)
    return config


async def test_a_drafted_reply_streams_to_the_threads_watchers_and_is_recorded(
    app,
    models_toml,  # noqa: F811 (the fixture)
    desk,  # noqa: F811 (the fixture)
    tmp_path: Path,
    wait_until,
) -> None:
    ticket_desk, _ = desk
    support = build(
        app,
        drafting_config(models_toml, tmp_path),
        ticket_desk,
        idle=3600,
        draft_task="support_reply",
    )
    token = chat_mod.new_token()
    thread = chat_mod.thread_of(token)
    assert thread is not None
    try:
        async with app, app.worker():
            await support.open(thread, chat_mod.customer_of(thread))
            with support.drafts.watching(thread) as pieces:
                await support.receive(
                    thread, chat_mod.customer_of(thread), "My new card has not arrived yet"
                )

                async def answered() -> chat_mod.Transcript | None:
                    found = await chat_mod.transcript(support, thread)
                    assert found is not None
                    return found if found.state == "ready" and len(found.entries) == 2 else None

                done = await wait_until(answered, what="a drafted answer", timeout=60)
            streamed = ""
            while not pieces.empty():
                piece = pieces.get_nowait()
                streamed = "" if piece.restart else streamed + piece.text
    finally:
        await app.gateway.close()  # type: ignore[union-attr]
    reply = done.entries[1]
    assert reply.drafted and reply.citations[0].id == "card-delivery"
    assert reply.text and reply.text == streamed.strip()  # what streamed is what was recorded
