"""A support thread as a customer sees it: tokens that name threads, and the transcript.

A web chat holds an unguessable token (`new_token`); the thread it names is a one-way hash
of it (`thread_of`), so the store, the audit chain and the agents' inbox never hold the
token itself, and knowing a thread id does not let anyone read or write the chat.

`transcript` rebuilds what was said from the thread's durable conversations
(`flowdesk.assistants.support.Support.runs`): a finished conversation from its output, one
still in progress from its timeline (the steps ``support.redact`` and ``support.outcome``)
and its open review task. Nothing is kept in memory, so a reload or a restarted server shows
the same conversation. The customer's messages are shown as the assistant kept them: with
personal data redacted.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel

from flowdesk.assistants import support as sup
from flowdesk.store import base, people

__all__ = ["Citation", "Entry", "Transcript", "new_token", "thread_of", "transcript"]

TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
"""What `new_token` makes: 24 random bytes, URL-safe base64 (192 bits)."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def thread_of(token: str) -> str | None:
    """The thread a token names, or None when it is not even shaped like a token."""
    if not TOKEN.match(token):
        return None
    return "chat-" + hashlib.sha256(f"flowdesk-chat:{token}".encode()).hexdigest()[:40]


def customer_of(thread_id: str) -> str:
    """The customer name the chat's conversations carry (no personal data: a pseudonym)."""
    return "web-" + thread_id.removeprefix("chat-")[:8]


class Citation(BaseModel):
    id: str
    title: str


class Entry(BaseModel):
    who: Literal["customer", "assistant", "agent", "system"]
    text: str
    citations: list[Citation] = []
    ticket: str | None = None
    drafted: bool = False
    """Written by a language model from the cited articles."""


class Transcript(BaseModel):
    entries: list[Entry]
    state: Literal["ready", "thinking", "with_person"]
    """``thinking``: a message is being handled; ``with_person``: it waits for an agent."""
    version: str
    """Changes whenever anything shown changes (a client redraws only then)."""


def _ticket_ref(ticket: Any) -> str:
    if not isinstance(ticket, dict):
        return "filed"
    service = ticket.get("service")
    if isinstance(service, dict) and service.get("id"):
        return str(service["id"])
    key = str(ticket.get("idempotency_key") or "")
    return "S-" + hashlib.sha256(key.encode()).hexdigest()[:8].upper()


def _replies(result: dict[str, Any], titles: dict[str, str]) -> list[Entry]:
    outcome = result.get("outcome")
    if outcome == "answered":
        reply = result.get("reply") or {}
        cited = [Citation(id=c, title=titles.get(c, c)) for c in reply.get("citations", [])]
        return [
            Entry(
                who="assistant",
                text=str(reply.get("answer", "")),
                citations=cited,
                drafted=bool(reply.get("drafted")),
            )
        ]
    if outcome == "ticket":
        ref = _ticket_ref(result.get("ticket"))
        text = (
            "I could not find an answer to that, so I have opened a ticket for you. "
            "Our support team will follow up."
        )
        return [Entry(who="assistant", text=text, ticket=ref)]
    if outcome != "escalated":
        return []
    out = [_handover(str(result.get("why", "")))]
    review = result.get("review") or {}
    reply = str(review.get("reply") or "").strip()
    if reply:
        out.append(Entry(who="agent", text=reply))
    if review.get("action") == "ticket":
        out.append(
            Entry(
                who="system",
                text="A ticket was opened for you.",
                ticket=_ticket_ref(result.get("ticket")),
            )
        )
    elif review.get("action") == "close" and not reply:
        out.append(Entry(who="system", text="The agent closed this request."))
    return out


def _handover(why: str) -> Entry:
    reason = {
        "customer asked for a person": "as you asked",
        "out of scope": "because I cannot answer that myself",
        "high priority": "because this looks urgent",
        "low model confidence": "because I am not sure I understood",
    }.get(why, "")
    return Entry(
        who="system",
        text=f"I am handing you over to a person {reason}. An agent will reply here.".replace(
            "  ", " "
        ),
    )


async def transcript(support: sup.Support, thread_id: str) -> Transcript | None:
    """The thread's transcript, or None when no conversation of it exists."""
    runs = await support.runs(thread_id)
    if not runs:
        return None
    titles = {a.id: a.title for a in support.knowledge.articles}
    entries: list[Entry] = []
    state: Literal["ready", "thinking", "with_person"] = "ready"
    for run in runs:
        output = run.output if isinstance(run.output, dict) else {}
        if run.status == base.RunStatus.SUCCEEDED and "messages" in output:
            for result in output["messages"]:
                entries.append(Entry(who="customer", text=str(result.get("text", ""))))
                entries += _replies(result, titles)
            continue
        waiting_on: dict[str, Any] | None = None
        for step in await support.app.steps(run.id):
            if step.status != "ok" or not isinstance(step.output, dict):
                continue
            if step.name == "support.redact":
                entries.append(Entry(who="customer", text=str(step.output.get("text", ""))))
                waiting_on = step.output
            elif step.name == "support.outcome":
                entries += _replies(step.output, titles)
                waiting_on = None
        if waiting_on is not None and not run.status.finished:
            state = "thinking"
            page = await support.app.store.list_tasks(
                people.TaskQuery(run_id=run.id, status=("open", "claimed"), limit=5)
            )
            for task in page.items:
                state = "with_person"
                context = task.context if isinstance(task.context, dict) else {}
                entries.append(_handover(str(context.get("why", ""))))
    digest = hashlib.sha256(
        "\n".join([state, *(e.model_dump_json() for e in entries)]).encode()
    ).hexdigest()[:16]
    return Transcript(entries=entries, state=state, version=digest)
