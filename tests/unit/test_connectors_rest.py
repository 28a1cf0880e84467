"""The REST connector against a real HTTP server (Starlette under uvicorn, in a thread, on
a free port of this machine), called from real workflows on both stores.

The server keeps one resource per ``Idempotency-Key`` (a repeat gets the first answer) and
counts every request, so the tests can tell "the call was made twice" from "the effect
happened twice". It also runs an OAuth2 token endpoint that counts the tokens it issues.
The secrets-file rules (`flowdesk.connectors.secrets`) are tested here too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets as pysecrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pydantic
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import flowdesk
from flowdesk import errors
from flowdesk.connectors import base, rest
from flowdesk.connectors import secrets as fsecrets

STATIC_TOKEN = "static-" + pysecrets.token_hex(12)
BASIC_USER = "flowdesk"
BASIC_PASSWORD = "pw-" + pysecrets.token_hex(12)
CLIENT_ID = "flowdesk-client"
CLIENT_SECRET = "cs-" + pysecrets.token_hex(12)


# -- the target: a small REST API with idempotency keys -------------------------------------
@dataclass
class ServerState:
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # by idempotency key
    requests: Counter[str] = field(default_factory=Counter)  # path -> requests
    keys: list[str | None] = field(default_factory=list)  # Idempotency-Key of each request
    auth_seen: list[str | None] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    tokens_valid: set[str] = field(default_factory=set)
    token_lifetime: int = 300
    fail_times: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    retry_after: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


STATE = ServerState()


def _authorized(request: Request) -> bool:
    header = request.headers.get("authorization")
    STATE.auth_seen.append(header)
    if header is None:
        return False
    if header == f"Bearer {STATIC_TOKEN}":
        return True
    expected = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    if header == f"Basic {expected}":
        return True
    return header.startswith("Bearer ") and header[7:] in STATE.tokens_valid


async def token_endpoint(request: Request) -> Response:
    STATE.requests["/oauth/token"] += 1
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    if request.headers.get("authorization") != f"Basic {expected}":
        return JSONResponse({"error": "invalid_client"}, status_code=401)
    if form.get("grant_type") != "client_credentials":
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
    token = "at-" + pysecrets.token_hex(16)
    STATE.tokens_issued.append(token)
    STATE.tokens_valid.add(token)
    return JSONResponse(
        {"access_token": token, "token_type": "Bearer", "expires_in": STATE.token_lifetime}
    )


async def create_invoice(request: Request) -> Response:
    STATE.requests["/invoices"] += 1
    key = request.headers.get("idempotency-key")
    STATE.keys.append(key)
    if not _authorized(request):
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    if not key:
        return JSONResponse({"error": "Idempotency-Key required"}, status_code=400)
    body = await request.json()
    with STATE.lock:
        if key in STATE.resources:
            return JSONResponse(
                STATE.resources[key], status_code=201, headers={"Idempotent-Replayed": "true"}
            )
        resource = {"id": f"inv-{len(STATE.resources) + 1}", **body}
        STATE.resources[key] = resource
    return JSONResponse(resource, status_code=201)


async def get_invoice(request: Request) -> Response:
    STATE.requests["/invoices/{id}"] += 1
    if not _authorized(request):
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    wanted = request.path_params["invoice_id"]
    for resource in STATE.resources.values():
        if resource["id"] == wanted:
            return JSONResponse(resource)
    return JSONResponse({"error": "not found"}, status_code=404)


async def flaky(request: Request) -> Response:
    """503 (with Retry-After when set) for the first ``fail_times`` requests of a key."""
    STATE.requests["/flaky"] += 1
    key = request.headers.get("idempotency-key") or ""
    STATE.keys.append(key)
    if STATE.failures[key] < STATE.fail_times:
        STATE.failures[key] += 1
        headers = {"Retry-After": STATE.retry_after} if STATE.retry_after else {}
        return JSONResponse({"error": "busy"}, status_code=503, headers=headers)
    return JSONResponse({"id": "flaky-ok", "amount": 1}, status_code=201)


async def limited(request: Request) -> Response:
    STATE.requests["/limited"] += 1
    key = request.headers.get("idempotency-key") or ""
    if STATE.failures[key] < STATE.fail_times:
        STATE.failures[key] += 1
        return JSONResponse(
            {"error": "slow down"},
            status_code=429,
            headers={"Retry-After": STATE.retry_after or "1"},
        )
    return JSONResponse({"id": "limited-ok", "amount": 2}, status_code=201)


async def slow(request: Request) -> Response:
    STATE.requests["/slow"] += 1
    await asyncio.sleep(5)
    return JSONResponse({"id": "slow", "amount": 3}, status_code=201)


async def refuse(request: Request) -> Response:
    STATE.requests["/refuse"] += 1
    return JSONResponse({"error": "amount must be positive"}, status_code=422)


async def not_json(request: Request) -> Response:
    STATE.requests["/not-json"] += 1
    return PlainTextResponse("hello", status_code=200)


async def wrong_shape(request: Request) -> Response:
    STATE.requests["/wrong-shape"] += 1
    return JSONResponse({"unexpected": True}, status_code=201)


API = Starlette(
    routes=[
        Route("/oauth/token", token_endpoint, methods=["POST"]),
        Route("/invoices", create_invoice, methods=["POST"]),
        Route("/invoices/{invoice_id}", get_invoice, methods=["GET"]),
        Route("/flaky", flaky, methods=["POST"]),
        Route("/limited", limited, methods=["POST"]),
        Route("/slow", slow, methods=["POST"]),
        Route("/refuse", refuse, methods=["POST"]),
        Route("/not-json", not_json, methods=["POST"]),
        Route("/wrong-shape", wrong_shape, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    config = uvicorn.Config(API, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="rest-target", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the REST target did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the REST target did not stop"


@pytest.fixture
def target(server_url: str) -> str:
    STATE.reset()
    return server_url


# -- models and helpers ------------------------------------------------------------------------
class Invoice(pydantic.BaseModel):
    customer: str
    amount: int


class Created(pydantic.BaseModel):
    id: str
    customer: str | None = None
    amount: int


class InvoiceRef(pydantic.BaseModel):
    invoice_id: str


CREATE = rest.operation("create_invoice", "POST", "/invoices", Invoice, Created)
FETCH = rest.operation("get_invoice", "GET", "/invoices/{invoice_id}", InvoiceRef, Created)
FLAKY = rest.operation("flaky", "POST", "/flaky", Invoice, Created)
LIMITED = rest.operation("limited", "POST", "/limited", Invoice, Created)
SLOW = rest.operation("slow", "POST", "/slow", Invoice, Created)
REFUSE = rest.operation("refuse", "POST", "/refuse", Invoice, Created)
NOT_JSON = rest.operation("not_json", "POST", "/not-json", Invoice, Created)
WRONG_SHAPE = rest.operation("wrong_shape", "POST", "/wrong-shape", Invoice, Created)


def secret_source() -> fsecrets.Secrets:
    """Secrets from the environment (a mapping standing in for os.environ)."""
    return fsecrets.Secrets(
        env={
            fsecrets.env_name("crm.token"): STATIC_TOKEN,
            fsecrets.env_name("crm.password"): BASIC_PASSWORD,
            fsecrets.env_name("crm.client_secret"): CLIENT_SECRET,
        }
    )


def bearer_connector(app: flowdesk.App, url: str, **kwargs: Any) -> rest.RestConnector:
    kwargs.setdefault("retry", base.TransportRetry(retries=3, delay=0.01, max_delay=0.05))
    return rest.RestConnector(
        "crm", app, url, auth=rest.Bearer(secret_source().get("crm.token")), **kwargs
    )


async def connector_audit(app: flowdesk.App, name: str = "crm") -> list[dict[str, Any]]:
    """The connector's ``connector.called`` audit records (read through a second App)."""
    async with flowdesk.App(app.database_url) as reader:
        rows = await reader.store.audit_rows(0, 1000, f"connector:{name}")
    return [
        {"actor": r[2], "action": r[3], **json.loads(r[5])}
        for r in rows
        if r[3] == base.AUDIT_ACTION
    ]


async def all_audit_text(app: flowdesk.App) -> str:
    async with flowdesk.App(app.database_url) as reader:
        return "\n".join(str(r[5]) for r in await reader.store.audit_rows(0, 100_000))


# -- calls from workflows: the run's key, audit records, step retries --------------------------
async def test_call_from_a_step_sends_the_run_key_and_is_audited(
    app: flowdesk.App, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    crm = bearer_connector(app, target)

    @app.step(name="post_invoice")
    async def post_invoice(invoice: Invoice) -> Created:
        return await crm.call(CREATE, invoice)

    @app.workflow("bill")
    async def bill(ctx: flowdesk.Context, customer: str, amount: int) -> Created:
        return await ctx.step(post_invoice, Invoice(customer=customer, amount=amount))

    async with app, app.worker(), crm:
        handle = await app.start("bill", {"customer": "Ada Lovelace", "amount": 120})
        result = await handle.result(timeout=30)
        assert isinstance(result, Created)
        assert result.id == "inv-1" and result.amount == 120
        assert STATE.keys == [f"{handle.id}:1"]
        assert STATE.auth_seen == [f"Bearer {STATIC_TOKEN}"]

        (record,) = await connector_audit(app)
        assert record["actor"] == "system:connector:crm"
        assert record["operation"] == "create_invoice"
        assert record["target"] == f"POST {target}/invoices"
        assert record["status"] == "ok" and record["detail"] == "http 201"
        assert record["idempotency_key"] == f"{handle.id}:1"
        assert (record["run_id"], record["seq"], record["step"]) == (handle.id, 1, "post_invoice")
        assert record["attempts"] == 1 and record["retries"] == []
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
        sent = {"customer": "Ada Lovelace", "amount": 120}
        # Keyed digests (HMAC under the store's index key), never bare hashes of payloads.
        for field, value in (
            ("input_sha256", sent),
            ("output_sha256", result.model_dump(mode="json")),
        ):
            digest = base.digest(value)
            assert record[field] != digest
            assert record[field] == await app.submit(lambda tx, d=digest: tx.keyed_digest(d))
        text = await all_audit_text(app)
        assert STATIC_TOKEN not in text
        assert "Ada Lovelace" not in "\n".join(json.dumps(r) for r in await connector_audit(app))
    assert STATIC_TOKEN not in caplog.text


async def test_a_step_retried_after_the_call_sends_the_same_key_once_created(
    app: flowdesk.App, target: str
) -> None:
    crm = bearer_connector(app, target)
    attempts: list[int] = []

    @app.step(retries=2, retry_delay=0.01)
    async def post_then_fail_once(invoice: Invoice) -> str:
        created = await crm.call(CREATE, invoice)
        info = flowdesk.current_step()
        assert info is not None
        attempts.append(info.attempt)
        if info.attempt == 1:
            raise RuntimeError("the step fails after the target did its work")
        return created.id

    @app.workflow("bill_twice")
    async def bill_twice(ctx: flowdesk.Context) -> str:
        return await ctx.step(post_then_fail_once, Invoice(customer="c", amount=5))

    async with app, app.worker(), crm:
        handle = await app.start("bill_twice")
        assert await handle.result(timeout=30) == "inv-1"
    assert attempts == [1, 2]
    assert STATE.requests["/invoices"] == 2
    assert STATE.keys == [f"{handle.id}:1", f"{handle.id}:1"]
    assert len(STATE.resources) == 1  # two calls, one effect


async def test_each_call_in_a_step_has_its_own_stable_key(app: flowdesk.App, target: str) -> None:
    crm = bearer_connector(app, target)

    @app.step
    async def two_invoices() -> list[str]:
        first = await crm.call(CREATE, {"customer": "a", "amount": 1})
        second = await crm.call(CREATE, {"customer": "b", "amount": 2})
        fetched = await crm.call(FETCH, InvoiceRef(invoice_id=second.id))
        return [first.id, second.id, fetched.id]

    @app.workflow("two")
    async def two(ctx: flowdesk.Context) -> list[str]:
        return await ctx.step(two_invoices)

    async with app, app.worker(), crm:
        handle = await app.start("two")
        assert await handle.result(timeout=30) == ["inv-1", "inv-2", "inv-2"]
        records = await connector_audit(app)
    assert STATE.keys == [f"{handle.id}:1", f"{handle.id}:1/2"]
    assert [r["idempotency_key"] for r in records] == [
        f"{handle.id}:1",
        f"{handle.id}:1/2",
        f"{handle.id}:1/3",
    ]
    # the path template, not the input's values: audit records hold no payload
    assert records[2]["target"] == f"GET {target}/invoices/{{invoice_id}}"


async def test_a_call_outside_a_step_needs_an_explicit_key(app: flowdesk.App, target: str) -> None:
    async with app, bearer_connector(app, target) as crm:
        with pytest.raises(errors.ConfigurationError, match="outside a step"):
            await crm.call(CREATE, {"customer": "a", "amount": 1})
        created = await crm.call(CREATE, {"customer": "a", "amount": 1}, idempotency_key="k-1")
        again = await crm.call(CREATE, {"customer": "a", "amount": 1}, idempotency_key="k-1")
    assert created == again and STATE.requests["/invoices"] == 2 and len(STATE.resources) == 1


# -- auth ------------------------------------------------------------------------------------------
async def test_basic_auth(app: flowdesk.App, target: str) -> None:
    auth = rest.Basic(BASIC_USER, secret_source().get("crm.password"))
    async with app, rest.RestConnector("crm", app, target, auth=auth) as crm:
        created = await crm.call(CREATE, {"customer": "b", "amount": 3}, idempotency_key="b-1")
    assert created.id == "inv-1"
    assert STATE.auth_seen[0] is not None and STATE.auth_seen[0].startswith("Basic ")
    text = await all_audit_text(app)
    assert BASIC_PASSWORD not in text and STATE.auth_seen[0][6:] not in text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_oauth2_client_credentials_caches_and_refreshes_the_token(
    app: flowdesk.App, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    STATE.token_lifetime = 300
    clock = Clock()
    auth = rest.OAuth2ClientCredentials(
        f"{target}/oauth/token",
        CLIENT_ID,
        secret_source().get("crm.client_secret"),
        refresh_before=60,
        clock=clock,
    )
    async with app, rest.RestConnector("crm", app, target, auth=auth) as crm:
        # Five concurrent calls on an empty cache share one token request.
        await asyncio.gather(
            *(
                crm.call(CREATE, {"customer": "o", "amount": i}, idempotency_key=f"o-{i}")
                for i in range(5)
            )
        )
        assert STATE.requests["/oauth/token"] == 1 and auth.token_requests == 1
        # Still fresh 239 s later (300 s lifetime, refreshed 60 s before it ends).
        clock.now += 239
        await crm.call(CREATE, {"customer": "o", "amount": 9}, idempotency_key="o-9")
        assert STATE.requests["/oauth/token"] == 1
        # Inside the refresh window: the next call fetches a new token first.
        clock.now += 2
        await crm.call(CREATE, {"customer": "o", "amount": 10}, idempotency_key="o-10")
        assert STATE.requests["/oauth/token"] == 2
        assert STATE.auth_seen[-1] == f"Bearer {STATE.tokens_issued[1]}"
        # The server revokes every token: the 401 drops the cached one, a new one is fetched,
        # and the request goes through (the same key: still one resource).
        STATE.tokens_valid.clear()
        created = await crm.call(CREATE, {"customer": "o", "amount": 11}, idempotency_key="o-11")
        assert created.amount == 11
        assert STATE.requests["/oauth/token"] == 3
        assert STATE.keys[-2:] == ["o-11", "o-11"]
    text = await all_audit_text(app)
    for secret in (CLIENT_SECRET, *STATE.tokens_issued):
        assert secret not in text
        assert secret not in caplog.text


async def test_oauth2_refused_client_is_a_permanent_error(app: flowdesk.App, target: str) -> None:
    auth = rest.OAuth2ClientCredentials(
        f"{target}/oauth/token", CLIENT_ID, fsecrets.Secret("wrong-secret-value", "bad")
    )
    async with app, rest.RestConnector("crm", app, target, auth=auth) as crm:
        with pytest.raises(errors.ConnectorRejected) as info:
            await crm.call(CREATE, {"customer": "x", "amount": 1}, idempotency_key="x")
    assert isinstance(info.value, flowdesk.Permanent)
    assert "wrong-secret-value" not in str(info.value)
    assert STATE.requests["/invoices"] == 0


# -- 429, 5xx, timeouts, refusals ------------------------------------------------------------------
async def test_5xx_is_retried_with_backoff_then_succeeds(app: flowdesk.App, target: str) -> None:
    STATE.fail_times = 2
    async with app, bearer_connector(app, target) as crm:
        created = await crm.call(FLAKY, {"customer": "f", "amount": 1}, idempotency_key="f-1")
    assert created.id == "flaky-ok"
    assert STATE.requests["/flaky"] == 3 and STATE.keys == ["f-1"] * 3
    (record,) = await connector_audit(app)
    assert record["status"] == "ok" and record["attempts"] == 3
    assert [r["reason"] for r in record["retries"]] == ["http 503", "http 503"]
    # exponential backoff with jitter in [0.5, 1.0]: delay 0.01, then 0.02
    assert 0.005 <= record["retries"][0]["wait_s"] <= 0.01
    assert 0.01 <= record["retries"][1]["wait_s"] <= 0.02


async def test_5xx_beyond_the_retries_is_unavailable(app: flowdesk.App, target: str) -> None:
    STATE.fail_times = 10
    retry = base.TransportRetry(retries=1, delay=0.01)
    async with app, bearer_connector(app, target, retry=retry) as crm:
        with pytest.raises(errors.ConnectorUnavailable) as info:
            await crm.call(FLAKY, {"customer": "f", "amount": 1}, idempotency_key="f-2")
    assert not isinstance(info.value, flowdesk.Permanent)  # the step may retry it
    assert STATE.requests["/flaky"] == 2
    (record,) = await connector_audit(app)
    assert record["status"] == "error" and record["detail"] == "ConnectorUnavailable"


async def test_429_waits_at_least_retry_after(app: flowdesk.App, target: str) -> None:
    STATE.fail_times, STATE.retry_after = 1, "1"
    async with app, bearer_connector(app, target) as crm:
        created = await crm.call(LIMITED, {"customer": "l", "amount": 2}, idempotency_key="l-1")
    assert created.id == "limited-ok" and STATE.requests["/limited"] == 2
    (record,) = await connector_audit(app)
    assert record["retries"] == [{"reason": "http 429", "wait_s": 1.0}]


async def test_a_retry_after_longer_than_the_cap_is_left_to_the_step(
    app: flowdesk.App, target: str
) -> None:
    STATE.fail_times, STATE.retry_after = 1, "120"
    async with app, bearer_connector(app, target) as crm:
        with pytest.raises(errors.ConnectorUnavailable) as info:
            await crm.call(FLAKY, {"customer": "l", "amount": 2}, idempotency_key="l-2")
    assert info.value.retry_after == 120.0
    assert STATE.requests["/flaky"] == 1  # not waited out by the connector


async def test_retry_after_as_an_http_date() -> None:
    import httpx

    now = 1_700_000_000.0
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 7))
    response = httpx.Response(503, headers={"Retry-After": when})
    assert rest.retry_after(response, now=lambda: now) == pytest.approx(7.0)
    assert rest.retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None


async def test_4xx_is_rejected_and_the_step_is_not_retried(app: flowdesk.App, target: str) -> None:
    crm = bearer_connector(app, target)

    @app.step(retries=3, retry_delay=0.01)
    async def post_refused() -> Created:
        return await crm.call(REFUSE, {"customer": "r", "amount": -1})

    @app.workflow("refused")
    async def refused(ctx: flowdesk.Context) -> Created:
        return await ctx.step(post_refused)

    async with app, app.worker(), crm:
        handle = await app.start("refused")
        with pytest.raises(flowdesk.RunFailed) as info:
            await handle.result(timeout=30)
    assert "ConnectorRejected" in str(info.value) and "422" in str(info.value)
    assert "amount must be positive" in str(info.value)
    assert STATE.requests["/refuse"] == 1


async def test_a_slow_target_times_out(app: flowdesk.App, target: str) -> None:
    retry = base.TransportRetry(retries=0)
    async with app, bearer_connector(app, target, timeout=0.3, retry=retry) as crm:
        with pytest.raises(errors.ConnectorUnavailable) as info:
            await crm.call(SLOW, {"customer": "s", "amount": 3}, idempotency_key="s-1")
    assert info.value.maybe_done  # the request went out: it may have had its effect
    assert "no answer within 0.3 s" in str(info.value)


async def test_answers_that_do_not_fit_the_output_model(app: flowdesk.App, target: str) -> None:
    async with app, bearer_connector(app, target) as crm:
        with pytest.raises(errors.BadTargetResponse, match="not JSON"):
            await crm.call(NOT_JSON, {"customer": "n", "amount": 1}, idempotency_key="n-1")
        with pytest.raises(errors.BadTargetResponse, match="does not fit Created"):
            await crm.call(WRONG_SHAPE, {"customer": "n", "amount": 1}, idempotency_key="n-2")


async def test_the_generic_request_operation_stays_on_the_base_url(
    app: flowdesk.App, target: str
) -> None:
    async with app, bearer_connector(app, target) as crm:
        answer = await crm.call(
            rest.REQUEST,
            {"method": "POST", "path": "/invoices", "body": {"customer": "g", "amount": 4}},
            idempotency_key="g-1",
        )
        assert answer.status == 201 and answer.body["id"] == "inv-1"
        for path in ("http://elsewhere.example/x", "//elsewhere.example/x", "invoices"):
            with pytest.raises(errors.ConnectorInputRefused):
                await crm.call(rest.REQUEST, {"method": "GET", "path": path}, idempotency_key="g")
    assert STATE.requests["/invoices"] == 1


# -- credentials never come from input; secrets never reach audit data or logs --------------------
class WithKey(pydantic.BaseModel):
    customer: str
    amount: int
    api_key: str


async def test_credentials_in_workflow_input_are_refused(
    app: flowdesk.App, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    crm = bearer_connector(app, target)
    with_key = rest.operation("create_invoice", "POST", "/invoices", WithKey, Created)

    @app.step
    async def smuggle(kind: str, value: str) -> str:
        if kind == "field":
            await crm.call(with_key, {"customer": "c", "amount": 1, "api_key": value})
        elif kind == "header":
            await crm.call(
                rest.REQUEST,
                {"method": "POST", "path": "/invoices", "headers": {"Authorization": value}},
            )
        else:
            await crm.call(CREATE, {"customer": value, "amount": 1})
        return "sent"

    @app.workflow("smuggler")
    async def smuggler(ctx: flowdesk.Context, kind: str, value: str) -> str:
        return await ctx.step(smuggle, kind, value)

    async with app, app.worker(), crm:
        cases = {
            "field": "key-" + pysecrets.token_hex(8),
            "header": "Bearer " + pysecrets.token_hex(12),
            "value": STATIC_TOKEN,  # the connector's own secret, passed as data
        }
        for kind, value in cases.items():
            handle = await app.start("smuggler", {"kind": kind, "value": value})
            with pytest.raises(flowdesk.RunFailed) as info:
                await handle.result(timeout=30)
            assert "ConnectorInputRefused" in str(info.value)
            assert value not in str(info.value)
        records = await connector_audit(app)
        assert [r["status"] for r in records] == ["refused"] * 3
        audit_text = "\n".join(json.dumps(r) for r in records)
        for value in cases.values():
            assert value not in audit_text
    assert STATE.requests["/invoices"] == 0  # nothing went out
    assert STATIC_TOKEN not in caplog.text


class Usage(pydantic.BaseModel):
    customer: str
    amount: int
    token_count: int


async def test_a_field_named_like_a_credential_can_be_allowed_per_operation(
    tmp_path: Path, target: str
) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/flowdesk.db")
    strict = rest.operation("create_invoice", "POST", "/invoices", Usage, Created)
    allowed = rest.operation(
        "create_invoice", "POST", "/invoices", Usage, Created, allow_fields=["token_count"]
    )
    usage = Usage(customer="u", amount=1, token_count=512)
    async with app, bearer_connector(app, target) as crm:
        with pytest.raises(errors.ConnectorInputRefused, match="token_count"):
            await crm.call(strict, usage, idempotency_key="u-1")
        created = await crm.call(allowed, usage, idempotency_key="u-1")
    assert created.amount == 1 and STATE.requests["/invoices"] == 1


def test_credentials_in_the_url_or_static_headers_are_refused(tmp_path: Path) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(errors.ConfigurationError, match="auth="):
        rest.RestConnector("crm", app, "http://user:pw@127.0.0.1:1/")
    with pytest.raises(errors.ConfigurationError, match="ApiKeyHeader"):
        rest.RestConnector("crm", app, "http://127.0.0.1:1/", headers={"X-Api-Key": "k"})


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("password", True),
        ("api_key", True),
        ("apiKey", True),
        ("X-Api-Key", True),
        ("Authorization", True),
        ("client_secret", True),
        ("accessToken", True),
        ("session_id", True),
        ("max_tokens", False),
        ("customer", False),
        ("amount", False),
        ("keyword", False),
    ],
)
def test_credential_names(name: str, credential: bool) -> None:
    assert base.credential_key(name) is credential


def test_redacted_urls_have_no_credentials() -> None:
    assert (
        base.redact_url("https://user:pw@api.example:8443/v1/x?page=2&api_key=abc&sig=zz#frag")
        == "https://api.example:8443/v1/x?page=2&api_key=***&sig=***"
    )
    assert base.redact_url("http://[::1]:80/a?token=t") == "http://[::1]:80/a?token=***"


# -- rate limit ------------------------------------------------------------------------------------
class VirtualTime:
    """A clock that only moves when the token bucket sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_the_token_bucket_limits_the_call_rate(app: flowdesk.App, target: str) -> None:
    vt = VirtualTime()
    bucket = base.TokenBucket(rate=10, burst=2, clock=vt.clock, sleep=vt.sleep)
    async with app, bearer_connector(app, target, rate=bucket) as crm:
        for i in range(5):
            await crm.call(CREATE, {"customer": "r", "amount": i}, idempotency_key=f"r-{i}")
    assert STATE.requests["/invoices"] == 5
    # the burst of 2 goes at once; each later call waits for a token: 1/rate = 0.1 s
    assert vt.sleeps == pytest.approx([0.1, 0.1, 0.1])
    assert not bucket.try_acquire()
    vt.now += 0.25
    assert bucket.try_acquire() and bucket.try_acquire() and not bucket.try_acquire()


def test_bad_settings_are_configuration_errors(tmp_path: Path) -> None:
    app = flowdesk.App(f"sqlite:///{tmp_path}/unused.db")  # never opened
    with pytest.raises(errors.ConfigurationError):
        base.TokenBucket(rate=0)
    with pytest.raises(errors.ConfigurationError):
        base.TransportRetry(retries=-1)
    with pytest.raises(errors.ConfigurationError):
        rest.RestConnector("Bad Name", app, "http://127.0.0.1:1")
    with pytest.raises(errors.ConfigurationError, match="has no fields"):
        rest.operation("x", "GET", "/items/{item_id}", Invoice, Created)


# -- secrets: environment and 0600 files -----------------------------------------------------------
def _write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_secrets_file_must_be_private(tmp_path: Path) -> None:
    toml = _write(tmp_path / "s.toml", '[crm]\ntoken = "from-toml"\n', 0o644)
    with pytest.raises(errors.ConfigurationError, match="chmod 600"):
        fsecrets.Secrets(toml)
    os.chmod(toml, 0o600)
    assert fsecrets.Secrets(toml).get("crm.token").reveal() == "from-toml"
    as_json = _write(tmp_path / "s.json", json.dumps({"crm": {"token": "from-json"}}), 0o640)
    with pytest.raises(errors.ConfigurationError, match="mode 0640"):
        fsecrets.Secrets(as_json)
    os.chmod(as_json, 0o400)
    assert fsecrets.Secrets(as_json).get("crm.token").reveal() == "from-json"


def test_secrets_lookup_and_masking(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.toml", '[crm]\ntoken = "file-value"\n', 0o600)
    env = {"FLOWDESK_SECRET_CRM_TOKEN": "env-value", "FLOWDESK_SECRET_MAIL_PASSWORD": "mail-pw"}
    found = fsecrets.Secrets(path, env=env)
    token = found.get("crm.token")
    assert token.reveal() == "file-value"  # the file wins
    assert found.get("mail.password").reveal() == "mail-pw"
    assert "file-value" not in f"{token} {token!r} {[token]}"
    with pytest.raises(errors.ConfigurationError, match="FLOWDESK_SECRET_CRM_OTHER"):
        found.get("crm.other")
    assert found.optional("crm.other") is None
    loaded = fsecrets.load(env={fsecrets.FILE_ENV: str(path)})
    assert loaded.get("crm.token").reveal() == "file-value"
    broken = _write(tmp_path / "b.toml", 'token = "unterminated\n', 0o600)
    with pytest.raises(errors.ConfigurationError, match="not valid TOML") as info:
        fsecrets.Secrets(broken)
    assert "unterminated" not in str(info.value)
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(token)


async def test_a_new_attempt_with_equal_step_info_starts_its_own_count(
    tmp_path: Path, target: str
) -> None:
    """A run recovered by the same process replays its step with a StepInfo equal to the
    old one (same run, seq, attempt 1): its first call must still send the plain key."""
    from flowdesk.engine import context

    app = flowdesk.App(f"sqlite:///{tmp_path}/flowdesk.db")
    async with app, bearer_connector(app, target) as crm:
        for _ in range(2):  # the first execution, then the recovered one
            token = context._current_step.set(flowdesk.StepInfo("run-x", 4, "post", 1))
            try:
                await crm.call(CREATE, {"customer": "z", "amount": 1})
                await crm.call(CREATE, {"customer": "z", "amount": 2})
            finally:
                context._current_step.reset(token)
    assert STATE.keys == ["run-x:4", "run-x:4/2", "run-x:4", "run-x:4/2"]
    assert len(STATE.resources) == 2


def test_the_connectors_api_is_pinned() -> None:
    import pickle

    import flowdesk.connectors

    assert flowdesk.connectors.__all__ == [
        "Call",
        "Connector",
        "Operation",
        "Outcome",
        "Secret",
        "Secrets",
        "TokenBucket",
        "Transient",
        "TransportRetry",
    ]
    for name in ("ConnectorUnavailable", "ConnectorRejected", "ConnectorInputRefused"):
        assert name in (errors.__doc__ or "")
        assert issubclass(getattr(errors, name), errors.ConnectorError)
    for permanent in (
        errors.ConnectorRejected,
        errors.ConnectorInputRefused,
        errors.BadTargetResponse,
        errors.EffectUncertain,
    ):
        assert issubclass(permanent, flowdesk.Permanent)
        assert permanent.__name__ in (errors.__doc__ or "")
    assert not issubclass(errors.ConnectorUnavailable, flowdesk.Permanent)
    exc = errors.ConnectorUnavailable(
        "down", connector="crm", operation="op", retry_after=3.0, maybe_done=True
    )
    back = pickle.loads(pickle.dumps(exc))
    assert (back.message, back.connector, back.retry_after, back.maybe_done) == (
        "down",
        "crm",
        3.0,
        True,
    )
