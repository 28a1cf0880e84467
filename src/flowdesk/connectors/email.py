"""E-mail over SMTP (the standard library's smtplib, in a worker thread).

::

    mail = SmtpConnector("mail", app, "smtp.internal", 587, sender="billing@example.com",
                         username="billing", password=secrets.get("mail.password"))

    @app.step
    async def notify(to: str) -> Sent:
        return await mail.call(SEND, Email(to=[to], subject="Invoice", text="..."))

**What SMTP can and cannot promise.** SMTP has no idempotency: a server that accepted a
message once accepts the same message again and delivers it twice. The connector narrows
that down in two ways:

1. Every message's ``Message-ID`` is derived from the connector's name and the call's
   idempotency key (`message_id`), so a message sent again for the same step carries the
   same Message-ID: a receiving system (a ticketing inbox, a mail archive, most mail
   clients' threading) can recognise and drop the repeat.
2. Each send is recorded in the flowdesk store's ``connector_effects`` table, keyed by
   ``(connector, idempotency_key)``: claimed (``started``) before the message goes out,
   ``done`` with its Message-ID once the server accepted it. A call whose key is ``done``
   (a step retried after its send, a run replayed after a crash that hit after the
   record) returns the recorded result and sends nothing.

What is left is the window between the server's "250 accepted" and the ``done`` record (a
crash, a lost connection after the message's final dot, a timeout): the row stays
``started`` and nobody knows whether the message went out. ``on_uncertain="resend"`` (the
default) sends it again with the same Message-ID, at least once, recognisably;
``on_uncertain="refuse"`` raises `EffectUncertain` instead and leaves the decision to an
operator (at most once). No setting gives exactly once: that needs the receiving side to
drop Message-IDs it has seen.

Failures before the message went out (no connection, a refused sender or recipient, a
temporary 4xx for the data) mark the row ``failed``, and a later call sends normally.
"""

from __future__ import annotations

import asyncio
import email.message
import email.utils
import hashlib
import ipaddress
import smtplib
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from flowdesk import errors
from flowdesk.connectors import base
from flowdesk.connectors.secrets import Secret

if TYPE_CHECKING:
    from flowdesk.engine.app import App

Security = Literal["starttls", "tls", "none"]
_RESERVED_HEADERS = frozenset(
    {"message-id", "from", "to", "cc", "bcc", "subject", "date", "reply-to", "sender"}
)

__all__ = ["SEND", "Email", "Sent", "SmtpConnector", "message_id"]


def _single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line (no CR or LF)")
    return value


def _address(value: str) -> str:
    _single_line(value)
    _, addr = email.utils.parseaddr(value)
    if not addr or "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        raise ValueError("is not an e-mail address")
    return value


class Email(pydantic.BaseModel):
    """The input of `SEND`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    to: list[str] = pydantic.Field(min_length=1)
    cc: list[str] = []
    bcc: list[str] = []
    subject: str
    text: str
    html: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = {}

    @pydantic.field_validator("to", "cc", "bcc")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [_address(v) for v in values]

    @pydantic.field_validator("reply_to")
    @classmethod
    def _reply_to(cls, value: str | None) -> str | None:
        return None if value is None else _address(value)

    @pydantic.field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        return _single_line(value)

    @pydantic.field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _single_line(name)
            _single_line(text)
            if name.lower() in _RESERVED_HEADERS or ":" in name:
                raise ValueError(f"header {name!r} is set by the connector")
        return value


class Sent(pydantic.BaseModel):
    """The output of `SEND`."""

    message_id: str
    accepted: int
    """How many recipients the server accepted (the others were refused)."""


SEND: base.Operation[Email, Sent] = base.Operation("send", Email, Sent, None)


def message_id(connector: str, key: str, domain: str) -> str:
    """The Message-ID of the message sent by ``connector`` under idempotency ``key``: the
    same for every attempt, every replay and every process."""
    digest = hashlib.sha256(f"{connector}\x00{key}".encode()).hexdigest()[:40]
    return f"<{digest}.flowdesk@{domain}>"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SmtpConnector(base.Connector):
    """An SMTP server (see the module docstring)."""

    kind = "smtp"
    records_effects = True

    def __init__(
        self,
        name: str,
        app: App,
        host: str,
        port: int = 587,
        *,
        sender: str,
        username: str | None = None,
        password: Secret | None = None,
        security: Security = "starttls",
        domain: str | None = None,
        timeout: float = 60.0,
        retry: base.TransportRetry | None = None,
        rate: base.TokenBucket | None = None,
        on_uncertain: Literal["resend", "refuse"] = "resend",
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            name, app, timeout=timeout, retry=retry, rate=rate, on_uncertain=on_uncertain
        )
        try:
            _address(sender)
        except ValueError:
            raise errors.ConfigurationError(f"connector {name!r}: bad sender {sender!r}") from None
        if security not in ("starttls", "tls", "none"):
            raise errors.ConfigurationError(
                f"connector {name!r}: security is starttls, tls or none"
            )
        if (username is None) != (password is None):
            raise errors.ConfigurationError(
                f"connector {name!r}: give both username and password, or neither"
            )
        if password is not None and security == "none" and not _loopback(host):
            raise errors.ConfigurationError(
                f"connector {name!r}: refusing to send a password to {host} without TLS; "
                "use security='starttls' or 'tls'"
            )
        self.host = host
        self.port = port
        self.sender = sender
        self.username = username
        self.password = password
        self.security = security
        self.domain = domain or email.utils.parseaddr(sender)[1].rpartition("@")[2]
        self._tls = tls_context

    def secrets(self) -> Sequence[Secret]:
        return () if self.password is None else (self.password,)

    def target(self, op: base.Operation[Any, Any], data: pydantic.BaseModel) -> str:
        return f"smtp://{self.host}:{self.port}"

    def message_id(self, key: str) -> str:
        return message_id(self.name, key, self.domain)

    def _message(self, data: Email, key: str) -> email.message.EmailMessage:
        msg = email.message.EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(data.to)
        if data.cc:
            msg["Cc"] = ", ".join(data.cc)
        if data.reply_to:
            msg["Reply-To"] = data.reply_to
        msg["Subject"] = data.subject
        msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = self.message_id(key)
        for name, value in data.headers.items():
            msg[name] = value
        msg.set_content(data.text)
        if data.html is not None:
            msg.add_alternative(data.html, subtype="html")
        return msg

    async def _perform(
        self, op: base.Operation[Any, Any], data: Any, call: base.Call
    ) -> base.Outcome:
        assert isinstance(data, Email)
        msg = self._message(data, call.idempotency_key)
        recipients = [email.utils.parseaddr(a)[1] for a in (*data.to, *data.cc, *data.bcc)]
        refused = await asyncio.to_thread(self._send, msg, recipients, op.name)
        accepted = len(recipients) - len(refused)
        return base.Outcome(
            Sent(message_id=str(msg["Message-ID"]), accepted=accepted),
            f"accepted {accepted} of {len(recipients)}",
        )

    def _connect(self) -> smtplib.SMTP:
        context = self._tls or ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if self.username is not None and self.password is not None:
                smtp.login(self.username, self.password.reveal())
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _send(
        self, msg: email.message.EmailMessage, recipients: list[str], op: str
    ) -> dict[str, Any]:
        """Send in this (worker) thread; returns the refused recipients."""
        try:
            smtp = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            raise self._rejected(op, "the server refused the login", exc.smtp_code) from None
        except smtplib.SMTPResponseException as exc:
            raise self._response(op, exc, sent=False) from None
        except (OSError, smtplib.SMTPException) as exc:  # no connection, no TLS ...
            raise base.Transient(f"smtp connect: {type(exc).__name__}") from None
        try:
            refused: dict[str, Any] = smtp.send_message(
                msg, from_addr=email.utils.parseaddr(self.sender)[1], to_addrs=recipients
            )
        except smtplib.SMTPRecipientsRefused as exc:
            codes = sorted({int(v[0]) for v in exc.recipients.values()})
            raise self._rejected(op, "the server refused every recipient", codes[0]) from None
        except smtplib.SMTPSenderRefused as exc:
            raise self._rejected(op, "the server refused the sender", exc.smtp_code) from None
        except smtplib.SMTPResponseException as exc:
            raise self._response(op, exc, sent=False) from None
        except (OSError, smtplib.SMTPException) as exc:
            # The connection broke while the message was on its way: it may have been
            # accepted just before.
            raise base.Transient(f"smtp send: {type(exc).__name__}", maybe_done=True) from None
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
        return refused

    def _response(self, op: str, exc: smtplib.SMTPResponseException, *, sent: bool) -> Exception:
        if 400 <= exc.smtp_code < 500:
            return base.Transient(f"smtp {exc.smtp_code}", maybe_done=sent)
        return self._rejected(op, "the server refused the message", exc.smtp_code)

    def _rejected(self, op: str, what: str, code: int) -> errors.ConnectorRejected:
        return errors.ConnectorRejected(
            f"connector {self.name!r}, operation {op!r}: {what} (smtp {code}) at "
            f"{self.host}:{self.port}. Nothing was sent; fix the address or the account.",
            connector=self.name,
            operation=op,
            status=code,
        )
