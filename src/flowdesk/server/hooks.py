"""``POST /hooks/{name}``: signed webhooks (`flowdesk.triggers.webhooks` says how to sign).

The route takes no API token: the HMAC signature is the credential. Errors use the API's
one error body; see `flowdesk.server.app`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from flowdesk.server import api
from flowdesk.server import schemas as s
from flowdesk.triggers import webhooks as wh

router = APIRouter()


class HookAccepted(BaseModel):
    """What a delivery did."""

    hook: str
    delivery_id: str
    mode: Literal["start", "signal"]
    run_id: str
    replay: bool


HookName = Annotated[
    str, Path(description="The hook's name.", min_length=1, max_length=100, pattern=wh.NAME_PATTERN)
]
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_HOOK_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "BadSignature (missing or wrong signature) or StaleDelivery (the "
        "timestamp is outside the tolerance).",
        "content": _ERROR,
    },
    404: {"description": "No such hook (signal mode: no such run).", "content": _ERROR},
    409: {
        "description": "DeliveryConflict: the delivery id came before with another body, or "
        "the signed request came before under another delivery id (signal mode: the run "
        "finished).",
        "content": _ERROR,
    },
    413: {"description": "The body is larger than the hook allows.", "content": _ERROR},
    422: {
        "description": "The body is not JSON or not the workflow's input, or the delivery id "
        "is missing.",
        "content": _ERROR,
    },
    503: {"description": "The hook's secret is not configured on the server.", "content": _ERROR},
}


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/hooks/{name}",
    status_code=201,
    response_model=HookAccepted,
    responses={
        200: {
            "model": HookAccepted,
            "description": "A replay: this delivery id came before with the same body; "
            "`X-Flowdesk-Replay: true`, nothing new happened.",
        },
        202: {"model": HookAccepted, "description": "Signal mode: the signal was stored."},
        **_HOOK_ERRORS,
    },
    tags=["hooks"],
    summary="Receive a signed webhook",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def receive_hook(
    name: HookName,
    request: Request,
    response: Response,
    svc: api.Svc,
    timestamp: Annotated[
        str | None,
        Header(
            alias=wh.TIMESTAMP_HEADER,
            max_length=20,
            description="Unix seconds when the delivery was signed.",
        ),
    ] = None,
    signature: Annotated[
        str | None,
        Header(
            alias=wh.SIGNATURE_HEADER,
            max_length=2000,
            description='`v1=<hex HMAC-SHA256 of timestamp + "." + body>`; several, comma '
            "separated, during a key rotation.",
        ),
    ] = None,
    delivery: Annotated[
        str | None,
        Header(
            alias=wh.DELIVERY_HEADER,
            max_length=200,
            description="Unique per delivery, the same on every retry of it.",
        ),
    ] = None,
) -> HookAccepted | JSONResponse:
    """Start (or signal) a run from a delivery signed with the hook's secret: send
    `X-Flowdesk-Timestamp` (Unix seconds, within the hook's tolerance, default 300 s, of the
    server's clock), `X-Flowdesk-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." +
    body)>` and `X-Flowdesk-Delivery` (unique per delivery, the same on every retry). Start
    mode answers 201, signal mode 202; the same delivery again answers 200 with the same run
    and `X-Flowdesk-Replay: true` (with another body: 409). No API token is needed."""
    hook = wh.hooks_of(svc.app).get(name)
    body = await _read_body(request, hook.max_body)
    if body is None:
        too_large = s.ErrorBody(
            error="PayloadTooLarge",
            message=f"Webhook {name!r} accepts bodies of at most {hook.max_body} bytes.",
        )
        return JSONResponse(too_large.model_dump(exclude_none=True), status_code=413)
    accepted = await wh.receive(
        svc.app, name, body, timestamp=timestamp, signature=signature, delivery_id=delivery
    )
    if accepted.replay:
        response.status_code = 200
        response.headers[wh.REPLAY_HEADER] = "true"
    elif accepted.mode == "signal":
        response.status_code = 202
    return HookAccepted(
        hook=accepted.hook,
        delivery_id=accepted.delivery_id,
        mode=accepted.mode,
        run_id=accepted.run_id,
        replay=accepted.replay,
    )
