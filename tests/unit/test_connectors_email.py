"""The SMTP connector against a real SMTP server (aiosmtpd, on a free port of this machine,
served by the test's own event loop while the connector sends from a worker thread), with
the ``connector_effects`` table on both stores.

The server keeps every message it accepts. It can refuse a recipient, ask for a login, or
drop the connection right after taking a message (before its "250 accepted" reply): the
uncertain case, where the connector cannot know whether the message went out.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import json
import logging
import secrets as pysecrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

import flowdesk
from flowdesk import errors
from flowdesk.connectors import base
from flowdesk.connectors import email as mail
from flowdesk.connectors.secrets import Secret

SENDER = "billing@flowdesk.test"
LOGIN = "billing"
PASSWORD = "smtp-" + pysecrets.token_hex(10)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage


@dataclass
class Mailbox:
    """The server's side: what it accepted, and how it misbehaves."""

    messages: list[Received] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # recipients answered with 550
    drop_after_data: int = 0  # take this many messages, then hang up before replying
    logins: list[str] = field(default_factory=list)

    def message_ids(self) -> list[str]:
        return [str(m.message["Message-ID"]) for m in self.messages]

    def unique(self) -> dict[str, Received]:
        """What a receiver that drops repeated Message-IDs keeps."""
        kept: dict[str, Received] = {}
        for m in self.messages:
            kept.setdefault(str(m.message["Message-ID"]), m)
        return kept


class Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.box.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        self.box.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), parsed))
        if self.box.drop_after_data > 0:
            self.box.drop_after_data -= 1
            assert server.transport is not None
            server.transport.close()  # the message is taken; the reply never comes
        return "250 2.0.0 accepted"


@pytest.fixture
async def mailbox() -> AsyncIterator[tuple[Mailbox, int]]:
    box = Mailbox()

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == LOGIN.encode()
            and data.password == PASSWORD.encode()
        )
        if ok:
            box.logins.append(LOGIN)
        return AuthResult(success=ok, handled=False)  # a refusal answers 535

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            Handler(box),
            hostname="mx.flowdesk.test",
            authenticator=authenticator,
            auth_require_tls=False,
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield box, port
    finally:
        server.close()
        await server.wait_closed()


def connector(app: flowdesk.App, port: int, **kwargs: Any) -> mail.SmtpConnector:
    kwargs.setdefault("retry", base.TransportRetry(retries=2, delay=0.01))
    return mail.SmtpConnector(
        "mail", app, "127.0.0.1", port, sender=SENDER, security="none", timeout=10, **kwargs
    )


INVOICE_MAIL = {"to": ["ada@customer.test"], "subject": "Invoice 7", "text": "Please pay."}


async def records(app: flowdesk.App) -> list[dict[str, Any]]:
    async with flowdesk.App(app.database_url) as reader:
        found = await reader.store.audit_rows(0, 1000, "connector:mail")
    return [{"action": r[3], **json.loads(r[5])} for r in found]


# -- sends from workflows: Message-ID from the key, one send per key ---------------------------
async def test_a_step_sends_once_even_when_it_runs_twice(
    app: flowdesk.App,
    mailbox: tuple[Mailbox, int],
    query: Callable[..., list[tuple[Any, ...]]],
    reveal: Callable[..., Any],
) -> None:
    box, port = mailbox
    smtp = connector(app, port)
    results: list[mail.Sent] = []

    @app.step(retries=2, retry_delay=0.01)
    async def send_invoice(to: str) -> mail.Sent:
        sent = await smtp.call(mail.SEND, {**INVOICE_MAIL, "to": [to]})
        results.append(sent)
        info = flowdesk.current_step()
        if info is not None and info.attempt == 1:
            raise RuntimeError("the step fails after the message went out")
        return sent

    @app.workflow("invoice_mail")
    async def invoice_mail(ctx: flowdesk.Context, to: str) -> mail.Sent:
        return await ctx.step(send_invoice, to)

    async with app, app.worker():
        handle = await app.start("invoice_mail", {"to": "ada@customer.test"})
        sent = await handle.result(timeout=60)
        audit = await records(app)
    key = f"{handle.id}:1"
    expected_id = smtp.message_id(key)
    assert expected_id == mail.message_id("mail", key, "flowdesk.test")
    assert sent == mail.Sent(message_id=expected_id, accepted=1)
    assert results == [sent, sent]  # the second attempt got the recorded result
    (received,) = box.messages  # ... and sent nothing
    assert received.message["Message-ID"] == expected_id
    assert received.message["Subject"] == "Invoice 7"
    assert received.rcpt_tos == ["ada@customer.test"] and received.mail_from == SENDER
    [(status, attempts, stored)] = query(
        "SELECT status, attempts, result FROM connector_effects"
        " WHERE connector = ? AND idempotency_key = ?",
        ("mail", key),
    )
    assert (status, attempts) == ("done", 1)
    # Recorded sealed with the run's key, as the step's own result is.
    assert "ada@customer.test" not in stored and expected_id not in stored
    assert reveal(handle.id, 1, "connector:mail", stored) == {
        "message_id": expected_id,
        "accepted": 1,
    }
    calls = [r for r in audit if r["action"] == base.AUDIT_ACTION]
    assert [(c["status"], c["idempotency_key"]) for c in calls] == [
        ("ok", key),
        ("duplicate", key),
    ]
    assert "ada@customer.test" not in json.dumps(audit)  # digests, not payloads


async def test_a_message_id_is_stable_per_key_and_differs_between_keys() -> None:
    first = mail.message_id("mail", "run-1:3", "example.com")
    assert first == mail.message_id("mail", "run-1:3", "example.com")
    assert first != mail.message_id("mail", "run-1:4", "example.com")
    assert first != mail.message_id("other", "run-1:3", "example.com")
    assert first.startswith("<") and first.endswith("@example.com>")


# -- the uncertain window ----------------------------------------------------------------------
async def test_a_lost_reply_is_sent_again_with_the_same_message_id(
    app: flowdesk.App,
    mailbox: tuple[Mailbox, int],
    query: Callable[..., list[tuple[Any, ...]]],
) -> None:
    box, port = mailbox
    box.drop_after_data = 1
    async with app, connector(app, port) as smtp:
        sent = await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="lost-1")
        audit = await records(app)
    # At least once: the server got the message twice, but both carry the same Message-ID,
    # so a receiver that drops repeated Message-IDs keeps one.
    assert box.message_ids() == [sent.message_id, sent.message_id]
    assert list(box.unique()) == [sent.message_id]
    assert query("SELECT status FROM connector_effects WHERE idempotency_key = 'lost-1'") == [
        ("done",)
    ]
    (call,) = [r for r in audit if r["action"] == base.AUDIT_ACTION]
    assert (
        call["attempts"] == 2
        and call["retries"][0]["reason"] == "smtp send: SMTPServerDisconnected"
    )


async def test_refuse_mode_leaves_an_uncertain_send_to_an_operator(
    app: flowdesk.App,
    mailbox: tuple[Mailbox, int],
    query: Callable[..., list[tuple[Any, ...]]],
    execute: Callable[..., int],
) -> None:
    box, port = mailbox
    box.drop_after_data = 1
    async with app, connector(app, port, on_uncertain="refuse") as smtp:
        with pytest.raises(errors.ConnectorUnavailable) as lost:
            await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="unsure-1")
        assert lost.value.maybe_done
        # The step's retry (or a replay after a crash) finds the send still "started".
        with pytest.raises(errors.EffectUncertain) as unsure:
            await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="unsure-1")
        assert isinstance(unsure.value, flowdesk.Permanent)
        assert len(box.messages) == 1  # at most once
        # The operator checked: it did arrive. Marked done, the call returns without a send.
        execute(
            "UPDATE connector_effects SET status = 'done', result = ?"
            " WHERE connector = 'mail' AND idempotency_key = 'unsure-1'",
            (json.dumps({"message_id": box.message_ids()[0], "accepted": 1}),),
        )
        again = await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="unsure-1")
    assert again.message_id == box.message_ids()[0] and len(box.messages) == 1
    assert query(
        "SELECT status, attempts FROM connector_effects WHERE idempotency_key = 'unsure-1'"
    ) == [("done", 1)]


# -- failures before anything went out ---------------------------------------------------------
async def test_a_refused_recipient_is_permanent_and_nothing_is_recorded_as_sent(
    app: flowdesk.App,
    mailbox: tuple[Mailbox, int],
    query: Callable[..., list[tuple[Any, ...]]],
) -> None:
    box, port = mailbox
    box.refuse.add("nobody@customer.test")
    to_nobody = {**INVOICE_MAIL, "to": ["nobody@customer.test"]}
    async with app, connector(app, port) as smtp:
        with pytest.raises(errors.ConnectorRejected, match="smtp 550") as info:
            await smtp.call(mail.SEND, to_nobody, idempotency_key="r-1")
        assert isinstance(info.value, flowdesk.Permanent)
        assert query("SELECT status FROM connector_effects WHERE idempotency_key = 'r-1'") == [
            ("failed",)
        ]
        box.refuse.clear()  # fixed: the same key may now send
        sent = await smtp.call(mail.SEND, to_nobody, idempotency_key="r-1")
    assert box.message_ids() == [sent.message_id]
    assert query(
        "SELECT status, attempts FROM connector_effects WHERE idempotency_key = 'r-1'"
    ) == [("done", 2)]


async def test_a_server_that_is_down_is_unavailable(
    app: flowdesk.App, query: Callable[..., list[tuple[Any, ...]]]
) -> None:
    loop = asyncio.get_running_loop()
    closed = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    async with app, connector(app, port, retry=base.TransportRetry(retries=1, delay=0.01)) as smtp:
        with pytest.raises(errors.ConnectorUnavailable) as info:
            await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="down-1")
    assert not info.value.maybe_done
    assert query("SELECT status FROM connector_effects WHERE idempotency_key = 'down-1'") == [
        ("failed",)
    ]


# -- credentials and input ---------------------------------------------------------------------
async def test_login_with_a_secret_that_never_shows(
    app: flowdesk.App, mailbox: tuple[Mailbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    box, port = mailbox
    password = Secret(PASSWORD, "mail.password")
    async with app, connector(app, port, username=LOGIN, password=password) as smtp:
        await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="login-1")
        with pytest.raises(errors.ConnectorInputRefused):
            await smtp.call(
                mail.SEND, {**INVOICE_MAIL, "text": f"pw {PASSWORD}"}, idempotency_key="login-2"
            )
        audit = await records(app)
    assert box.logins == [LOGIN] and len(box.messages) == 1
    assert PASSWORD not in json.dumps(audit) and PASSWORD not in caplog.text
    wrong = Secret("not-the-password", "mail.password")
    async with app, connector(app, port, username=LOGIN, password=wrong) as smtp:
        with pytest.raises(errors.ConnectorRejected, match="refused the login"):
            await smtp.call(mail.SEND, INVOICE_MAIL, idempotency_key="login-3")
    assert len(box.messages) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"subject": "Hi\r\nBcc: everyone@customer.test"},
        {"to": ["not an address"]},
        {"to": []},
        {"headers": {"Message-ID": "<forged@x>"}},
        {"headers": {"X-Note": "a\nBcc: x@y.test"}},
    ],
    ids=["subject-injection", "bad-address", "no-recipient", "own-message-id", "header-injection"],
)
async def test_bad_messages_are_refused_before_sending(
    tmp_path: Any, mailbox: tuple[Mailbox, int], bad: dict[str, Any]
) -> None:
    box, port = mailbox
    app = flowdesk.App(f"sqlite:///{tmp_path}/flowdesk.db")
    async with app, connector(app, port) as smtp:
        with pytest.raises(errors.ConnectorInputRefused):
            await smtp.call(mail.SEND, {**INVOICE_MAIL, **bad}, idempotency_key="bad")
    assert box.messages == []


def test_a_password_is_never_sent_without_tls(tmp_path: Any) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(errors.ConfigurationError, match="without TLS"):
        mail.SmtpConnector(
            "mail",
            app,
            "smtp.example.com",
            sender=SENDER,
            username=LOGIN,
            password=Secret(PASSWORD),
            security="none",
        )
