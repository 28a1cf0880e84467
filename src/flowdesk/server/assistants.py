"""REST routes of the reference assistants: ``POST /approvals`` (a request for the
approvals assistant; the acting user is the requester), ``POST /messages`` (a customer
message for the support assistant; follow-ups on a thread signal its running
conversation) and ``POST /invoices`` (a document, or an e-mail with invoices attached, for
the invoice assistant). Each answers 404 ``AssistantNotInstalled`` when the app has no such
assistant (`flowdesk.assistants.approvals.Approvals`, `flowdesk.assistants.support.Support`,
`flowdesk.assistants.invoices.Invoices`).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from flowdesk import errors
from flowdesk.assistants import installed
from flowdesk.assistants import invoices as inv
from flowdesk.assistants import support as support_mod
from flowdesk.assistants.approvals import ApprovalRequest
from flowdesk.server import api
from flowdesk.server import schemas as s
from flowdesk.store import people

router = APIRouter(tags=["assistants"])

Line = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=s.NAME_PATTERN, strict=True)
]
Email = Annotated[
    str,
    StringConstraints(min_length=3, max_length=200, pattern=r"^[^@\s<>]+@[^@\s<>]+\.[A-Za-z]{2,}$"),
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApprovalIn(_In):
    type: Literal["purchase", "access", "expense"]
    amount: float = Field(ge=0, le=1e12, allow_inf_nan=False)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$", strict=True)]
    cost_centre: Line
    justification: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    vendor: Line | None = None
    notify: list[Email] = Field(default_factory=list, max_length=20)


class ApprovalOut(BaseModel):
    run_id: str
    created: bool


class MessageIn(_In):
    thread_id: Line
    customer: Line
    text: Annotated[str, StringConstraints(min_length=1, max_length=10_000)]
    email: Email | None = None


class MessageOut(BaseModel):
    run_id: str
    thread_id: str
    started: bool
    """True when this message started a new conversation; False when it was a follow-up."""


TasksRead = Annotated[people.UserRecord, Depends(api.need("tasks:read"))]
RunsWrite = Annotated[people.UserRecord, Depends(api.need("runs:write"))]


@router.post(
    "/approvals",
    status_code=201,
    response_model=ApprovalOut,
    responses=api.errs(*api.AUTH, 404, 409, 422),
    summary="Request an approval",
)
async def request_approval(body: ApprovalIn, svc: api.Svc, user: TasksRead) -> ApprovalOut:
    """Start deciding a purchase, access or expense request; the acting user is the
    requester (and may not approve it)."""
    approvals = installed.approvals(svc.app)
    handle = await approvals.submit(ApprovalRequest(requester=user.id, **body.model_dump()))
    return ApprovalOut(run_id=handle.id, created=handle.created)


@router.post(
    "/messages",
    status_code=202,
    response_model=MessageOut,
    responses=api.errs(*api.AUTH, 404, 409, 422),
    summary="Take a customer message",
)
async def take_message(
    body: MessageIn, svc: api.Svc, user: RunsWrite, response: Response
) -> MessageOut:
    """Triage a customer message; a message on a thread whose conversation still runs is
    delivered to it as a follow-up."""
    support = installed.support(svc.app)
    run_id, started = await support.receive(
        body.thread_id, body.customer, body.text, email=body.email
    )
    return MessageOut(run_id=run_id, thread_id=body.thread_id, started=started)


MAX_EMAIL_BYTES = 1024 * 1024


@router.post(
    "/messages/email",
    status_code=202,
    response_model=MessageOut,
    responses=api.errs(*api.AUTH, 404, 409, 413, 415, 422),
    summary="Take a customer e-mail",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def take_email(request: Request, svc: api.Svc, user: RunsWrite) -> MessageOut:
    """The body is the whole e-mail (``Content-Type: message/rfc822``), as a mail server
    hands it over. Its thread comes from ``References`` / ``In-Reply-To`` (a reply joins
    its conversation); the same e-mail twice (one ``Message-ID``) is one message."""
    support = installed.support(svc.app)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "message/rfc822":
        raise errors.UnsupportedDocument(
            f"Content-Type {kind or '(none)'!r} is not taken here: send the e-mail as "
            "message/rfc822"
        )
    data = await _body(request, MAX_EMAIL_BYTES)
    try:
        mail = support_mod.read_email(data)
    except errors.Permanent as exc:
        raise errors.DocumentError(str(exc)) from exc
    run_id, started = await support.receive(
        mail.thread_id,
        mail.customer,
        mail.text,
        email=mail.email,
        message_id=support_mod.mail_key(mail.message_id, hashlib.sha256(data).hexdigest()),
    )
    return MessageOut(run_id=run_id, thread_id=mail.thread_id, started=started)


class InvoiceRun(BaseModel):
    run_id: str
    document_id: str
    name: str
    created: bool
    """False when the same file was sent before: this is the run it started then."""


class InvoicesOut(BaseModel):
    runs: list[InvoiceRun]


_DOCUMENT_TYPES = (*sorted(inv.ATTACHMENT_TYPES), "application/octet-stream")


async def _body(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise errors.DocumentTooLarge(f"the file is {size} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise errors.DocumentTooLarge(f"the file is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/invoices",
    status_code=201,
    response_model=InvoicesOut,
    responses=api.errs(*api.AUTH, 404, 413, 415, 422),
    summary="Send an invoice (a PDF or image file, or an e-mail with invoices attached)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                t: {"schema": {"type": "string", "format": "binary"}}
                for t in (
                    *_DOCUMENT_TYPES,
                    "message/rfc822",
                )
            },
        }
    },
)
async def send_invoice(
    request: Request,
    svc: api.Svc,
    user: RunsWrite,
    name: Annotated[str, Query(min_length=1, max_length=300, description="The file's name.")] = (
        "invoice"
    ),
    locale: Annotated[
        str | None,
        Query(pattern=r"^[a-z]{2}(_[A-Z]{2})?$", description="The vendor's locale, e.g. de_DE."),
    ] = None,
) -> InvoicesOut:
    """The body is the file itself (``Content-Type: application/pdf``, ``image/png``,
    ``image/jpeg`` or ``image/tiff``), or a whole e-mail (``message/rfc822``), each PDF or
    image attachment of which is one invoice. The same file sent twice gives the same run.
    A file that cannot be read is still taken: its run records why and asks a person."""
    invoices = installed.invoices(svc.app)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (*_DOCUMENT_TYPES, "message/rfc822"):
        raise errors.UnsupportedDocument(
            f"Content-Type {kind or '(none)'!r} is not taken here: send the file as "
            f"{', '.join(_DOCUMENT_TYPES)}, or an e-mail as message/rfc822"
        )
    data = await _body(request, inv.MAX_FILE_BYTES)
    if not data:
        raise errors.EmptyDocument(f"{name}: the request body is empty (0 bytes)")
    if kind == "message/rfc822":
        found = inv.attachments(data)
        if not found:
            raise errors.UnsupportedDocument("the e-mail has no PDF or image attachment")
    else:
        found = [(name, data)]
    runs = []
    for file_name, content in found:
        handle = await invoices.submit(
            content,
            file_name,
            source="email" if kind == "message/rfc822" else "api",
            locale=locale,
            submitted_by=user.id,
        )
        runs.append(
            InvoiceRun(
                run_id=handle.id,
                document_id=hashlib.sha256(content).hexdigest(),
                name=file_name,
                created=handle.created,
            )
        )
    return InvoicesOut(runs=runs)
