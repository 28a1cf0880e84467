"""The customer support chat in a real browser (Debian's Chromium through Playwright, as in
`test_ui_browser`, whose browser fixture and page checks this module reuses).

A customer opens ``/chat``, gets a knowledge-base answer with its sources (drafted by the
packaged local language model, streamed into the page as it is written), asks for a
person; an agent answers from the inbox in the web UI; the customer reloads the page and
reads the agent's reply. Screenshots go to ``test-output/screenshots/``.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ui_invoice
import uvicorn
from playwright.sync_api import Browser, expect
from test_assistant_support import build, models_toml  # noqa: F401 (a fixture)
from test_chat import drafting_config
from test_ui_browser import Site, browser, shot, sign_in  # noqa: F401 (a fixture)

import flowdesk
from flowdesk.assistants import tickets as tk
from flowdesk.connectors import sql
from flowdesk.governance import audit as audit_log
from flowdesk.server import app as server

QUESTION = "I ordered a card two weeks ago and it still has not arrived"
REPLY = "Hello, this is Anna from support: I have sent you a new card today."


def _serve(
    root: Path,
    models: Path,
    sock: socket.socket,
    ready: threading.Event,
    box: dict[str, object],
) -> None:
    db = root / "tickets.db"
    with sqlite3.connect(db) as conn:
        conn.execute(tk.TICKETS_DDL)
    app = flowdesk.App(f"sqlite:///{root / 'chat.db'}", poll_interval=0.05)
    tickets = sql.SqlConnector("tickets-db", app, f"sqlite:///{db}")
    build(
        app,
        drafting_config(models, root),
        tk.TicketDesk(tickets),
        agents=["anna"],
        agent_groups=[],
        idle=3600,
        draft_task="support_reply",
    )
    api = server.create_app(
        app,
        audit=audit_log.AuditLog(app, root / "audit.key"),
        worker=True,
        session_key="browser-test-session-key-0123",
    )
    config = uvicorn.Config(api, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    srv = uvicorn.Server(config)  # (open event streams would hold a graceful stop for ever)
    box["server"] = srv

    async def main() -> None:
        async with app:
            await ui_invoice.create_users(app)
        async with tickets:
            serving = asyncio.create_task(srv.serve(sockets=[sock]))
            while not srv.started and not serving.done():
                await asyncio.sleep(0.02)
            box["started"] = srv.started
            ready.set()
            await serving
        assert app.gateway is not None
        await app.gateway.close()  # type: ignore[attr-defined]

    try:
        asyncio.run(main())
    finally:
        ready.set()


@pytest.fixture(scope="module")
def chat_site(
    tmp_path_factory: pytest.TempPathFactory,
    models_toml: Path,  # noqa: F811 (the fixture)
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("chat-browser")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ready = threading.Event()
    box: dict[str, object] = {}
    thread = threading.Thread(
        target=_serve, args=(root, models_toml, sock, ready, box), daemon=True
    )
    thread.start()
    assert ready.wait(60), "the chat server did not start within 60 s"
    assert box.get("started") and thread.is_alive(), "the chat server failed to start"
    try:
        yield Site(f"http://127.0.0.1:{port}", [], [])
    finally:
        srv = box["server"]
        srv.should_exit = True  # type: ignore[attr-defined]
        thread.join(30)
        sock.close()


def test_a_customer_chats_then_an_agent_takes_over(
    browser: Browser,  # noqa: F811 (the fixture)
    chat_site: Site,
) -> None:
    customer = browser.new_context(viewport={"width": 1100, "height": 900})
    page = customer.new_page()
    page.goto(chat_site.url + "/chat")
    expect(page.get_by_role("heading", name="How can we help?")).to_be_visible()
    shot(page, "20-chat-welcome")
    page.get_by_role("button", name="Start a conversation").click()
    assert "/chat/" in page.url and "?" not in page.url  # the token is in no URL
    box = page.get_by_label("Your message")
    expect(page.locator("body")).to_have_attribute("data-stream", "open")  # drafts stream here
    box.fill("   ")  # nothing to send: said at once, nothing posted
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_have_text("Write a message first.")

    # a question the knowledge base answers, with its sources
    box.fill(QUESTION)
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#transcript .msg-assistant")
    expect(answer).to_have_count(1, timeout=20_000)
    expect(answer.locator(".msg-sources .tag").first).to_have_attribute(
        "data-article", "card-delivery"
    )
    expect(page.locator(".msg-customer .msg-text")).to_have_text([QUESTION])
    expect(box).to_have_value("")  # cleared for the next message
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(answer.locator(".msg-note")).to_contain_text("Written by our assistant")
    chunks = page.locator("body").get_attribute("data-draft-chunks")
    assert chunks is not None and int(chunks) > 0, "the draft did not stream into the page"
    expect(page.locator("#draft")).to_be_hidden()  # the recorded answer replaced it

    # asking for a person: handed over, the page says so
    box.fill("Thanks. Can I talk to a person about it, please?")
    box.press("Enter")
    expect(page.locator("#transcript .msg-system")).to_contain_text(
        "handing you over", timeout=20_000
    )
    expect(page.get_by_role("status")).to_contain_text("Waiting for an agent")
    shot(page, "21-chat-handed-over")

    # an agent answers from the inbox
    agent = sign_in(browser, chat_site, "anna")
    expect(agent).to_have_url(chat_site.url + "/ui/inbox")
    agent.locator("#inbox [data-row-link]").first.click()
    expect(agent.get_by_role("heading", level=1)).to_contain_text("customer asked for a person")
    agent.get_by_role("combobox", name="Action").select_option("answer")
    agent.get_by_label("Reply").fill(REPLY)
    agent.get_by_role("button", name="Complete task").click()
    expect(agent.get_by_role("status").first).to_contain_text("Completed by anna")
    agent.context.close()

    # the customer's page, reloaded, shows the agent's reply (rebuilt from the durable run)
    page.reload()
    expect(page.locator(".msg-agent .msg-text")).to_have_text(REPLY, timeout=20_000)
    expect(page.locator("#transcript .msg-who").last).to_have_text("Support agent")
    expect(page.locator("#transcript .msg")).to_have_count(5)  # you, answer, you, hand-over, agent
    shot(page, "22-chat-agent-reply")
    customer.close()
