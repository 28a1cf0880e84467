"""REST routes of the reference assistants: ``POST /approvals`` (a request for the
approvals assistant; the acting user is the requester) and ``POST /messages`` (a customer
message for the support assistant; follow-ups on a thread signal its running
conversation). Each answers 404 ``AssistantNotInstalled`` when the app has no such
assistant (`flowdesk.assistants.approvals.Approvals`, `flowdesk.assistants.support.Support`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from flowdesk.assistants import installed
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
