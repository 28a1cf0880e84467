"""The support-triage assistant: customer messages in, an answer, a ticket or a person out.

::

    support = Support(app, KnowledgeBase.from_folder("data/support"), TicketDesk(db, api))
    run_id, started = await support.receive("thread-7", "cust-42", "My card never came")

Each thread is one run of ``support.conversation`` (started with the idempotency key
``support-thread:<thread id>``); every message, the first included, reaches it as the
signal ``message``, so a follow-up on a thread whose conversation still runs is handled
by that run, in order. A conversation ends when no message came for ``idle`` seconds; a
later message on the thread starts the next conversation (key
``support-thread:<thread id>:after:<previous run id>``).

Each message goes through:

1. PII redaction (`flowdesk.models.pii.Redactor`, a step): only the redacted text goes
   further (model, ticket, knowledge search, the person's task);
2. intent classification with out-of-scope detection: ``ctx.model(intent_task, text)``
   (a local classifier through the gateway; its out-of-scope label or a confidence below
   ``out_of_scope_below`` means out of scope);
3. sentiment and priority from word lists (`sentiment`, `priority`: documented there);
4. one outcome: **answer** (the best knowledge-base articles by BM25, cited), **ticket**
   (`TicketDesk`, keyed by the step's idempotency key) when the knowledge base has nothing
   good enough, or **escalate** (a human task with the suggestion and its confidence, due by
   the priority's SLA and reassigned to ``escalate_to`` when overdue) when the message is
   out of scope, the gateway says a person should decide, or the priority is high.

Messages come in by the REST API (``POST /messages``, `Support.receive`), by e-mail (`watch`:
``.eml`` files dropped in a folder, e.g. a mail server's delivery folder; `read_email` turns
one into a message, its thread found from ``References`` / ``In-Reply-To``) or by an event
stream (``support.event``: point a Redis Streams, NATS JetStream or Kafka consumer of
`flowdesk.triggers` at it; each stream message is a JSON `IncomingMessage`). E-mail and
stream messages each start one small intake run (once per file or stream message, however
often it is delivered), which hands the message to its conversation with an id; a
conversation handles a message id once, so an intake run replayed after a crash, or the
same e-mail dropped twice, is not answered twice. Intake runs run side by side, so two
messages of one thread that arrive together may be handled in either order.

A customer who asks for a person ("human", "agent", "person", ...: `asks_for`) is handed to
one, and one who asks for a ticket gets one, whatever the classifier says. Each message's
outcome is recorded as the step ``support.outcome``, so a conversation still in progress
can be read back from its timeline (`Support.runs` lists a thread's conversations: the web
chat rebuilds its transcript from them).

With ``draft_task`` (a generative task of the gateway, e.g. ``support_reply``), an answer
is written by that model from the cited articles and streamed as it is written
(`drafts`: the web chat shows it live); when the model fails or refuses, the
knowledge-base excerpt is sent instead, never an unchecked draft. A follow-up's draft sees
the conversation's last three turns; a message handed to a person for low model confidence
gets a draft too, in the task, for that person to check and send. Without ``draft_task``,
no language model is involved anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import email.utils
import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowdesk import errors
from flowdesk.assistants import drafts as drafts_mod
from flowdesk.assistants import installed
from flowdesk.assistants import knowledge as kb
from flowdesk.assistants import tickets as tk
from flowdesk.engine import tasks
from flowdesk.engine.app import App
from flowdesk.engine.context import Context, current_step
from flowdesk.models import pii
from flowdesk.store import base
from flowdesk.triggers import filedrop

__all__ = [
    "CONVERSATION",
    "EMAIL_INTAKE",
    "EVENT_INTAKE",
    "IncomingMessage",
    "Mail",
    "Review",
    "Support",
    "asks_for",
    "priority",
    "read_email",
    "sentiment",
]

CONVERSATION = "support.conversation"
EMAIL_INTAKE = "support.email"
EVENT_INTAKE = "support.event"
MESSAGE = "message"
MAX_TEXT = 20_000

_WORD = re.compile(r"[a-z']+")
NEGATIVE = frozenset(
    "angry annoyed awful bad broken disappointed disgusting frustrated furious hate horrible "
    "joke never ridiculous scam terrible unacceptable useless worst wrong".split()
)
POSITIVE = frozenset("appreciate excellent glad great happy love perfect thank thanks".split())
URGENT = frozenset(
    "urgent urgently immediately asap emergency fraud stolen hacked unauthorised "
    "unauthorized compromised".split()
)
HIGH_RISK_INTENTS = frozenset(
    {
        "lost_or_stolen_card",
        "lost_or_stolen_phone",
        "compromised_card",
        "card_payment_not_recognised",
        "cash_withdrawal_not_recognised",
        "direct_debit_payment_not_recognised",
    }
)
_PERSON = r"(?:human|agent|person|representative|someone|somebody)"
ASK_PERSON = re.compile(
    rf"\b(?:talk|speak|chat|connect|transfer|put|get|want|need)\b[^.?!]*\b{_PERSON}\b"
    rf"|\b(?:real|live)\s+{_PERSON}\b|^\W*{_PERSON}\W*$",
    re.IGNORECASE,
)
"""Asking for a person: "can I talk to a human?", "a real person please", "agent"."""
ASK_TICKET = re.compile(
    r"\b(?:open|file|raise|create|log|make|want|need)\b[^.?!]*\btickets?\b|\bcomplaint\b",
    re.IGNORECASE,
)
"""Asking for a ticket: "please open a ticket", "I want to make a complaint"."""
DEFAULT_SLA = {"high": 15 * 60.0, "medium": 4 * 3600.0, "low": 24 * 3600.0}


def sentiment(text: str) -> str:
    """``negative`` when the message has more words of `NEGATIVE` than of `POSITIVE`
    (a word right after "not"/"no" counts for the other side), ``positive`` for the
    reverse, else ``neutral``. Plain word lists: fast, explainable, and good enough to
    order a queue; not a model."""
    words = _WORD.findall(text.lower())
    score = 0
    for i, word in enumerate(words):
        flip = -1 if i > 0 and words[i - 1] in ("not", "no", "never") else 1
        if word in NEGATIVE:
            score -= flip
        elif word in POSITIVE:
            score += flip
    return "negative" if score < 0 else "positive" if score > 0 else "neutral"


def priority(text: str, intent: str, mood: str) -> str:
    """``high`` for an urgent word (`URGENT`) or a high-risk intent (`HIGH_RISK_INTENTS`:
    money or a card possibly in the wrong hands), ``medium`` for a negative message,
    else ``low``."""
    words = set(_WORD.findall(text.lower()))
    if words & URGENT or intent in HIGH_RISK_INTENTS:
        return "high"
    return "medium" if mood == "negative" else "low"


def asks_for(text: str) -> Literal["person", "ticket"] | None:
    """``person`` when the customer asks to talk to one (`ASK_PERSON`), else ``ticket``
    when they ask for a ticket (`ASK_TICKET`), else None. Patterns, not a model: a
    customer who names what they want gets it, and a person merely mentioned ("I sent
    money to a person") is not a request."""
    if ASK_PERSON.search(text):
        return "person"
    return "ticket" if ASK_TICKET.search(text) else None


class IncomingMessage(BaseModel):
    """A customer message from an event stream: the JSON body of one stream message."""

    model_config = ConfigDict(extra="forbid")

    thread_id: str = Field(min_length=1, max_length=200)
    customer: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    email: str | None = Field(default=None, max_length=320)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Mail:
    """A customer e-mail as a message: its thread, a pseudonymous customer id, the text."""

    thread_id: str
    customer: str
    text: str
    email: str | None
    message_id: str | None


_QUOTE_HEADER = re.compile(r"^\s*(?:On\b.{0,200}\bwrote:|-{2,}\s*Original Message\s*-{2,})\s*$")
_SUBJECT_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr)\s*:\s*)+", re.IGNORECASE)
_TAG = re.compile(r"<(?:script|style)\b.*?</(?:script|style)>|<[^>]+>", re.IGNORECASE | re.DOTALL)
_MESSAGE_ID = re.compile(r"<([^<>\s]{1,250})>")


def _ids(value: str | None) -> list[str]:
    return _MESSAGE_ID.findall(str(value or ""))


def mail_customer(address: str) -> str:
    """The customer id of an e-mail sender: a pseudonym (``mail-`` and 16 hex digits of
    the address's SHA-256), since customer ids show in task titles, which are not
    encrypted. The address itself travels with the message, encrypted."""
    return "mail-" + hashlib.sha256(address.strip().lower().encode("utf-8")).hexdigest()[:16]


def mail_key(message_id: str | None, sha256: str) -> str:
    """The message id an e-mail is delivered under: its ``Message-ID``, so the same e-mail
    received twice is one message, else the SHA-256 of its bytes."""
    return f"email:{message_id or sha256}"


def read_email(raw: bytes) -> Mail:
    """The customer message in the RFC 822 e-mail ``raw``.

    The thread is the first message of the conversation: the first id in ``References``,
    else ``In-Reply-To``, else the e-mail's own ``Message-ID`` (a new thread). The text is
    the subject (without "Re:" / "Fwd:") and the plain-text body (else the HTML body's
    text) down to the quoted earlier message ("On ... wrote:", lines starting with ">").
    Raises `errors.Permanent` with the reason when ``raw`` is not such an e-mail.
    """
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        sender = email.utils.parseaddr(str(msg.get("From") or ""))[1]
        own = _ids(msg.get("Message-ID"))
        first = _ids(msg.get("References")) or _ids(msg.get("In-Reply-To")) or own
        thread = first[0] if first else None
        subject = _SUBJECT_PREFIX.sub("", str(msg.get("Subject") or "")).strip()
        part = msg.get_body(preferencelist=("plain", "html"))
        body = "" if part is None else str(part.get_content())
        is_html = part is not None and part.get_content_subtype() == "html"
    except (LookupError, ValueError, TypeError, AttributeError, UnicodeError) as exc:
        raise errors.Permanent(f"not a readable e-mail: {exc}") from exc
    if not sender or "@" not in sender:
        raise errors.Permanent("the e-mail has no sender address (From:)")
    if thread is None:
        raise errors.Permanent("the e-mail has no Message-ID, References or In-Reply-To")
    if is_html:
        body = html.unescape(_TAG.sub(" ", body))
    lines: list[str] = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if _QUOTE_HEADER.match(line):
            break
        if not line.lstrip().startswith(">"):
            lines.append(line.rstrip())
    text = re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()
    if subject and subject.lower() not in text.lower():
        text = f"{subject}\n{text}".strip()
    if not text:
        raise errors.Permanent("the e-mail has no text (subject and body are empty)")
    return Mail(
        thread_id=f"mail:{thread}",
        customer=mail_customer(sender),
        text=text[:MAX_TEXT],
        email=sender,
        message_id=own[0] if own else None,
    )


def _said(turn: Mapping[str, Any]) -> str:
    """What the assistant answered to an earlier message, in a word when not in words."""
    reply = turn.get("reply") or (turn.get("review") or {}).get("reply")
    if isinstance(reply, dict):
        return str(reply.get("answer") or "")
    if reply:
        return str(reply)
    return f"({turn.get('outcome', 'no answer')})"


class Review(BaseModel):
    """What the person decides for an escalated message."""

    action: Literal["answer", "ticket", "close"]
    reply: str = Field(default="", max_length=10_000)


class Support:
    """Registers the assistant's workflow and steps on ``app``."""

    def __init__(
        self,
        app: App,
        knowledge: kb.KnowledgeBase,
        desk: tk.TicketDesk,
        *,
        intent_task: str = "support_intent",
        out_of_scope_label: str = "out_of_scope",
        out_of_scope_below: float = 0.2,
        min_answer_score: float = 2.0,
        answer_below_confidence: float = 0.5,
        sla: Mapping[str, float] | None = None,
        agents: Sequence[str] = (),
        agent_groups: Sequence[str] = ("support",),
        escalate_to: Sequence[str] = (),
        idle: float = 3600.0,
        redactor: pii.Redactor | None = None,
        draft_task: str | None = None,
    ) -> None:
        self.app = app
        self.knowledge = knowledge
        self.desk = desk
        self.intent_task = intent_task
        self.oos_label = out_of_scope_label
        self.oos_below = out_of_scope_below
        self.min_score = min_answer_score
        self.answer_below = answer_below_confidence
        self.sla = {**DEFAULT_SLA, **(sla or {})}
        self.agents = list(agents)
        self.agent_groups = list(agent_groups)
        self.escalate_to = list(escalate_to)
        self.idle = idle
        self.redactor = redactor or pii.Redactor()
        self.draft_task = draft_task
        self.drafts = drafts_mod.Drafts()
        self._register()
        installed.of(app).support = self

    async def receive(
        self,
        thread_id: str,
        customer: str,
        text: str,
        *,
        email: str | None = None,
        message_id: str | None = None,
    ) -> tuple[str, bool]:
        """Deliver a message to its thread's running conversation, or start one.
        Returns ``(run id, started)``. A conversation handles each ``message_id`` once:
        delivering the same id again is harmless."""
        message: dict[str, Any] = {"text": text, "email": email}
        if message_id is not None:
            message["id"] = message_id
        key = f"support-thread:{thread_id}"
        for _ in range(1000):
            handle = await self.app.start(
                CONVERSATION, {"thread_id": thread_id, "customer": customer}, idempotency_key=key
            )
            try:
                await self.app.signal(handle.id, MESSAGE, message)
            except errors.InvalidState:  # that conversation ended: the next one
                key = f"support-thread:{thread_id}:after:{handle.id}"
                continue
            return handle.id, handle.created
        raise errors.InvalidState(f"Thread {thread_id}: too many conversations.")

    async def open(self, thread_id: str, customer: str) -> str:
        """Start the thread's first conversation before any message (a chat window that
        was just opened); it waits ``idle`` seconds for one. Returns its run id; the same
        run when called again."""
        handle = await self.app.start(
            CONVERSATION,
            {"thread_id": thread_id, "customer": customer},
            idempotency_key=f"support-thread:{thread_id}",
        )
        return handle.id

    def watch(self, folder: str | Path, **options: Any) -> filedrop.FileDrop:
        """A `FileDrop` on ``folder`` (``*.eml`` files): each e-mail dropped there is a
        customer message (`read_email`). Call ``run()`` on it. An e-mail that cannot be
        read fails its intake run and goes to ``failed/`` with the reason."""
        return filedrop.FileDrop(
            self.app, folder, workflow=EMAIL_INTAKE, **{"pattern": "*.eml", **options}
        )

    async def runs(self, thread_id: str) -> list[base.RunRecord]:
        """The thread's conversations, oldest first (empty for an unknown thread), found by
        the idempotency keys `receive` starts them with."""
        found: list[base.RunRecord] = []
        key = f"support-thread:{thread_id}"
        while len(found) < 1000:
            run = await self.app.store.run_by_key(key)
            if run is None:
                break
            found.append(run)
            key = f"support-thread:{thread_id}:after:{run.id}"
        return found

    def _register(self) -> None:
        app = self.app
        handled_total = app.metrics.counter(
            "support_messages_total",
            "Customer messages handled, by outcome (answered, ticket, escalated) and priority",
            ["outcome", "priority"],
        )
        time_to_resolution = app.metrics.histogram(
            "support_time_to_resolution_seconds",
            "From a message's arrival to its outcome (an escalated one: the person's decision)",
            ["outcome"],
        )

        @app.step(name="support.redact")
        def redact(text: str) -> dict[str, Any]:
            found = self.redactor.redact(text)
            return {"text": found.text, "redactions": dict(found.counts)}

        @app.step(name="support.search")
        def search(query: str) -> list[dict[str, Any]]:
            return [dataclasses.asdict(h) for h in self.knowledge.search(query, k=3)]

        @app.step(name="support.ticket")
        async def ticket(row: tk.TicketRow) -> dict[str, Any]:
            info = current_step()
            assert info is not None
            return await self.desk.create(row, info.idempotency_key)

        @app.step(name="support.outcome")
        def record_outcome(result: dict[str, Any]) -> dict[str, Any]:
            return result  # recorded: the transcript of a running conversation reads it

        async def draft(
            ctx: Context,
            thread_id: str,
            text: str,
            good: list[dict[str, Any]],
            suggestion: dict[str, Any],
            earlier: Sequence[dict[str, Any]] = (),
        ) -> dict[str, Any]:
            assert self.draft_task is not None
            articles = "\n\n".join(f"{h['title']}: {h['excerpt']}" for h in good[:2])
            turns = "".join(
                f"Customer: {turn['text']}\nAnswer: {_said(turn)}\n" for turn in earlier[-3:]
            )
            before = f"Earlier in this conversation:\n{turns}\n" if turns else ""
            prompt = (
                "You answer customers of a bank. Using only the help-centre articles below, "
                "answer the customer's message in at most three sentences.\n\n"
                f"{articles}\n\n{before}Customer: {text}\nAnswer:"
            )
            try:
                drafted = await ctx.model(
                    self.draft_task,
                    prompt,
                    data="internal",
                    key=thread_id,
                    on_chunk=self.drafts.sink(thread_id),
                )
            except errors.StepFailed:  # refused or failed: the articles' own words
                return suggestion
            written = (drafted.text or "").strip()
            if not written:
                return suggestion
            model = f"{drafted.model}:{drafted.version}"
            return {**suggestion, "answer": written, "drafted": True, "draft_model": model}

        async def handle(
            ctx: Context,
            thread_id: str,
            customer: str,
            message: dict[str, Any],
            earlier: Sequence[dict[str, Any]],
        ) -> dict[str, Any]:
            clean: dict[str, Any] = await ctx.step(redact, str(message["text"]))
            text = clean["text"]
            # Runs already past this point when it was added keep their recorded history.
            wants = asks_for(text) if ctx.version("customer-asks", 1) else None
            # Drafts that see the conversation so far, and drafts for a person to check.
            in_context = self.draft_task is not None and bool(ctx.version("draft-context", 1))
            answer = await ctx.model(self.intent_task, text, data="internal", key=thread_id)
            intent = str(answer.label)
            confidence = float(answer.confidence or 0.0)
            out_of_scope = intent == self.oos_label or confidence < self.oos_below
            mood = sentiment(text)
            level = priority(text, intent, mood)
            query = text if out_of_scope else f"{text} {intent.replace('_', ' ')}"
            hits: list[dict[str, Any]] = await ctx.step(search, query)
            good = [h for h in hits if h["score"] >= self.min_score]
            suggestion = (
                {"answer": good[0]["excerpt"], "citations": [h["id"] for h in good]}
                if good
                else None
            )
            result: dict[str, Any] = {
                "text": text,
                "redactions": clean["redactions"],
                "intent": intent,
                "confidence": confidence,
                "out_of_scope": out_of_scope,
                "model": f"{answer.model}:{answer.version}",
                "sentiment": mood,
                "priority": level,
                "suggestion": suggestion,
            }
            row = tk.TicketRow(
                thread_id=thread_id,
                customer=customer,
                intent=intent,
                priority=level,
                sentiment=mood,
                text=text,
            )
            if out_of_scope or answer.escalate or level == "high" or wants == "person":
                why = (
                    "customer asked for a person"
                    if wants == "person"
                    else "out of scope"
                    if out_of_scope
                    else "high priority"
                    if level == "high"
                    else "low model confidence"
                )
                if in_context and good and why == "low model confidence":
                    # The person gets a drafted reply to check, beside the articles.
                    result["suggestion"] = await draft(
                        ctx, thread_id, text, good, suggestion or {}, earlier
                    )
                due = timedelta(seconds=self.sla[level])
                review = await ctx.human_task(
                    "support.review",
                    title=f"[{level}] {customer}: {intent} ({why})",
                    form=Review,
                    context={**result, "thread_id": thread_id, "why": why},
                    candidates=tasks.Assignees(users=self.agents, groups=self.agent_groups),
                    due=due,
                    priority={"high": 2, "medium": 1, "low": 0}[level],
                    labels=[level, intent],
                    escalation=(
                        tasks.Escalation.reassign(
                            users=self.escalate_to, reason=f"{level} priority SLA passed"
                        )
                        if self.escalate_to
                        else None
                    ),
                )
                result.update(outcome="escalated", why=why, review=review.model_dump())
                if review.action == "ticket":
                    result["ticket"] = await ctx.step(ticket, row)
                return result
            if suggestion is not None and confidence >= self.answer_below and wants is None:
                if self.draft_task is not None and ctx.version("draft-reply", 1):
                    suggestion = await draft(
                        ctx, thread_id, text, good, suggestion, earlier if in_context else ()
                    )
                result.update(outcome="answered", reply=suggestion)
                return result
            filed: dict[str, Any] = await ctx.step(ticket, row)
            result.update(outcome="ticket", ticket=filed)
            return result

        @app.workflow(CONVERSATION)
        async def conversation(ctx: Context, thread_id: str, customer: str) -> dict[str, Any]:
            handled: list[dict[str, Any]] = []
            seen: set[str] = set()
            while True:
                try:
                    message = await ctx.wait_signal(MESSAGE, timeout=self.idle)
                except errors.WaitTimeout:
                    break
                if message.get("id") is not None:  # delivered by an intake run
                    if message["id"] in seen:
                        continue  # that run was replayed after a crash: handled already
                    seen.add(str(message["id"]))
                # Runs already past this point when it was added keep their recorded history.
                arrived = ctx.now() if ctx.version("time-to-resolution", 1) else None
                result = await handle(ctx, thread_id, customer, message, handled)
                if ctx.version("customer-asks", 1):
                    await ctx.step(record_outcome, result)
                handled.append(result)
                outcome = str(result["outcome"])
                ctx.metric(handled_total, 1, outcome=outcome, priority=str(result["priority"]))
                if arrived is not None:
                    seconds = (ctx.now() - arrived).total_seconds()
                    ctx.metric(time_to_resolution, seconds, outcome=outcome)
            return {"thread_id": thread_id, "customer": customer, "messages": handled}

        @app.step(name="support.read_email")
        async def read_mail(path: str) -> dict[str, Any]:
            return dataclasses.asdict(read_email(await asyncio.to_thread(Path(path).read_bytes)))

        @app.step(name="support.deliver")
        async def deliver(message: dict[str, Any], message_id: str) -> dict[str, Any]:
            run_id, started = await self.receive(
                str(message["thread_id"]),
                str(message["customer"]),
                str(message["text"]),
                email=message.get("email"),
                message_id=message_id,
            )
            return {"conversation": run_id, "started": started}

        @app.workflow(EMAIL_INTAKE)
        async def email_intake(
            ctx: Context, path: str, name: str, sha256: str, size: int
        ) -> dict[str, Any]:
            mail: dict[str, Any] = await ctx.step(read_mail, path)
            return await ctx.step(deliver, mail, mail_key(mail["message_id"], sha256))

        @app.workflow(EVENT_INTAKE)
        async def event_intake(ctx: Context, message: IncomingMessage) -> dict[str, Any]:
            # One intake run per stream message (the consumer's idempotency key).
            return await ctx.step(deliver, message.model_dump(), f"event:{ctx.run_id}")
