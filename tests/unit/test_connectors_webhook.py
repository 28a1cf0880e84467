"""The webhook connector against a real receiver (Starlette under uvicorn, in a thread, on
a free port of this machine) that verifies every signature itself, with ``hmac`` and the
receiver's copy of the secret, the way a partner's endpoint would: timestamp + "." + body,
HMAC-SHA256, ``X-Flowdesk-Signature: v1=<hex>`` (one of several during a rotation), a
timestamp within 5 minutes. It remembers deliveries by ``X-Flowdesk-Delivery``: a repeat
with the same body is acknowledged and not applied again; another body under a known id is
refused (409).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets as pysecrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import flowdesk
from flowdesk import errors
from flowdesk.connectors import base, webhook
from flowdesk.connectors.secrets import Secret

RECEIVER_SECRET = "whsec-" + pysecrets.token_hex(16)
OLD_SECRET = "whsec-old-" + pysecrets.token_hex(16)
TOLERANCE = 300


@dataclass
class Receiver:
    secrets: list[str] = field(default_factory=lambda: [RECEIVER_SECRET])
    requests: int = 0
    verified: int = 0
    applied: dict[str, bytes] = field(default_factory=dict)  # delivery id -> body
    bodies: list[bytes] = field(default_factory=list)
    timestamps: list[str] = field(default_factory=list)
    fail_times: int = 0
    status: int = 200

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


RECEIVER = Receiver()


def _signature_ok(timestamp: str, raw: bytes, header: str) -> bool:
    offered = [p.strip()[3:] for p in header.split(",") if p.strip().startswith("v1=")]
    for secret in RECEIVER.secrets:
        mac = hmac.new(secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
        if any(hmac.compare_digest(mac.hexdigest(), o) for o in offered):
            return True
    return False


async def receive(request: Request) -> Response:
    RECEIVER.requests += 1
    raw = await request.body()
    stamp = request.headers.get("x-flowdesk-timestamp", "")
    signature = request.headers.get("x-flowdesk-signature", "")
    delivery = request.headers.get("x-flowdesk-delivery", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE:
        return JSONResponse({"error": "stale"}, status_code=401)
    if not _signature_ok(stamp, raw, signature):
        return JSONResponse({"error": "bad signature"}, status_code=401)
    RECEIVER.verified += 1
    RECEIVER.bodies.append(raw)
    RECEIVER.timestamps.append(stamp)
    if RECEIVER.fail_times > 0:
        RECEIVER.fail_times -= 1
        return JSONResponse({"error": "busy"}, status_code=503)
    if RECEIVER.status != 200:
        return JSONResponse({"error": "no"}, status_code=RECEIVER.status)
    known = RECEIVER.applied.get(delivery)
    if known is not None:
        if known != raw:
            return JSONResponse({"error": "another body under a known id"}, status_code=409)
        return JSONResponse({"duplicate": True})
    RECEIVER.applied[delivery] = raw
    return JSONResponse({"applied": True}, status_code=202)


@pytest.fixture(scope="module")
def receiver_url() -> Iterator[str]:
    api = Starlette(routes=[Route("/hooks/flowdesk", receive, methods=["POST"])])
    config = uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="webhook-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hooks/flowdesk"
    finally:
        srv.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the receiver did not stop"


@pytest.fixture
def url(receiver_url: str) -> str:
    RECEIVER.reset()
    return receiver_url


class InvoicePaid(pydantic.BaseModel):
    invoice: str
    amount_cents: int


PAID = webhook.event("invoice.paid", InvoicePaid)


def hook(app: flowdesk.App, url: str, **kwargs: Any) -> webhook.WebhookConnector:
    kwargs.setdefault("secret", Secret(RECEIVER_SECRET, "partner.webhook_secret"))
    kwargs.setdefault("retry", base.TransportRetry(retries=2, delay=0.01))
    return webhook.WebhookConnector("partner", app, url, **kwargs)


async def audit_text(app: flowdesk.App) -> str:
    async with flowdesk.App(app.database_url) as reader:
        return "\n".join(str(r[5]) for r in await reader.store.audit_rows(0, 10_000))


# -- deliveries from workflows ------------------------------------------------------------------
async def test_a_repeated_step_delivers_the_same_signed_body_once_applied(
    app: flowdesk.App, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    partner = hook(app, url)

    @app.step(retries=2, retry_delay=0.01)
    async def tell_partner(paid: InvoicePaid) -> webhook.Delivered:
        delivered = await partner.call(PAID, paid)
        info = flowdesk.current_step()
        if info is not None and info.attempt == 1:
            raise RuntimeError("the step fails after the delivery")
        return delivered

    @app.workflow("paid")
    async def paid(ctx: flowdesk.Context, invoice: str, amount_cents: int) -> webhook.Delivered:
        return await ctx.step(tell_partner, InvoicePaid(invoice=invoice, amount_cents=amount_cents))

    async with app, app.worker(), partner:
        handle = await app.start("paid", {"invoice": "INV-7", "amount_cents": 12_000})
        delivered = await handle.result(timeout=60)
        text = await audit_text(app)
    key = f"{handle.id}:1"
    assert delivered == webhook.Delivered(delivery_id=key, status=200)  # the repeat's answer
    assert RECEIVER.requests == RECEIVER.verified == 2  # both signatures verified
    assert list(RECEIVER.applied) == [key]  # applied once
    assert RECEIVER.bodies[0] == RECEIVER.bodies[1]  # byte for byte
    assert json.loads(RECEIVER.bodies[0]) == {
        "id": key,
        "event": "invoice.paid",
        "data": {"invoice": "INV-7", "amount_cents": 12000},
    }
    assert RECEIVER_SECRET not in text and RECEIVER_SECRET not in caplog.text
    assert "INV-7" not in text  # audit data holds digests, not payloads


async def test_a_transient_failure_is_retried_with_a_fresh_signature(
    app: flowdesk.App, url: str
) -> None:
    RECEIVER.fail_times = 2
    async with app, hook(app, url) as partner:
        out = await partner.call(
            webhook.DELIVER,
            {"event": "ticket.closed", "data": {"ticket": 42}},
            idempotency_key="d-1",
        )
    assert out.status == 202 and RECEIVER.verified == 3
    assert len(set(RECEIVER.bodies)) == 1 and list(RECEIVER.applied) == ["d-1"]
    assert all(abs(time.time() - int(t)) < TOLERANCE for t in RECEIVER.timestamps)


async def test_a_rotated_secret_signs_with_both(app: flowdesk.App, url: str) -> None:
    RECEIVER.secrets = [OLD_SECRET]  # the receiver has not switched yet
    secrets = [Secret(RECEIVER_SECRET, "new"), Secret(OLD_SECRET, "old")]
    async with app, hook(app, url, secret=secrets) as partner:
        await partner.call(PAID, {"invoice": "a", "amount_cents": 1}, idempotency_key="rot-1")
        RECEIVER.secrets = [RECEIVER_SECRET]  # ... and now it has
        await partner.call(PAID, {"invoice": "b", "amount_cents": 2}, idempotency_key="rot-2")
    assert RECEIVER.verified == 2


async def test_a_wrong_secret_is_refused_for_good(app: flowdesk.App, url: str) -> None:
    wrong = Secret("whsec-wrong-" + pysecrets.token_hex(8), "wrong")
    async with app, hook(app, url, secret=wrong) as partner:
        with pytest.raises(errors.ConnectorRejected, match="answered 401") as info:
            await partner.call(PAID, {"invoice": "a", "amount_cents": 1}, idempotency_key="w-1")
    assert isinstance(info.value, flowdesk.Permanent)
    assert RECEIVER.requests == 1 and RECEIVER.verified == 0


async def test_gone_is_permanent(app: flowdesk.App, url: str) -> None:
    RECEIVER.status = 410
    async with app, hook(app, url) as partner:
        with pytest.raises(errors.ConnectorRejected, match="410"):
            await partner.call(PAID, {"invoice": "a", "amount_cents": 1}, idempotency_key="g-1")
    assert RECEIVER.requests == 1


# -- the signing helpers ----------------------------------------------------------------------
def test_sign_and_verify() -> None:
    payload = webhook.body("run:1", "invoice.paid", {"b": 1, "a": "é"})
    assert payload == '{"data":{"a":"é","b":1},"event":"invoice.paid","id":"run:1"}'.encode()
    now = 1_700_000_000
    headers = {
        "X-Flowdesk-Timestamp": str(now),
        "X-Flowdesk-Signature": webhook.sign("s3cret", now, payload),
    }
    expected = hmac.new(b"s3cret", f"{now}.".encode() + payload, hashlib.sha256).hexdigest()
    assert headers["X-Flowdesk-Signature"] == f"v1={expected}"
    assert webhook.verify("s3cret", headers, payload, now=now + 10)
    assert not webhook.verify("other", headers, payload, now=now)
    assert not webhook.verify("s3cret", headers, payload + b" ", now=now)
    assert not webhook.verify("s3cret", headers, payload, now=now + 301)  # stale
    rotated = {**headers, "X-Flowdesk-Signature": "v1=00," + headers["X-Flowdesk-Signature"]}
    assert webhook.verify("s3cret", rotated, payload, now=now)


def test_configuration_is_checked(tmp_path: Path) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(errors.ConfigurationError, match="credentials"):
        webhook.WebhookConnector("p", app, "https://u:p@x.example/h", secret=Secret("k"))
    with pytest.raises(errors.ConfigurationError, match="secret="):
        webhook.WebhookConnector("p", app, "https://x.example/h", secret=[])
    with pytest.raises(pydantic.ValidationError):
        webhook.event("bad name with spaces", InvoicePaid)
