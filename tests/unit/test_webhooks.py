"""Signed webhooks (`flowdesk.triggers.webhooks`, ``POST /hooks/{name}``), in process
through httpx's ASGI transport, on both stores: signatures, stale timestamps, replays, the
delivery memory in the store, start and signal modes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import flowdesk
from flowdesk import RunStatus, errors, triggers
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.server import app as server
from flowdesk.triggers import webhooks as wh

SECRET = "s3cret-orders"


def register(app: flowdesk.App, secret_file: Path) -> None:
    @app.step(name="total")
    async def total(items: list[int]) -> int:
        return sum(items)

    @app.workflow("order")
    async def order(ctx: flowdesk.Context, order_id: str, items: list[int]) -> dict[str, Any]:
        return {"order_id": order_id, "total": await ctx.step(total, items)}

    @app.workflow("waiter")
    async def waiter(ctx: flowdesk.Context) -> Any:
        return await ctx.wait_signal("approved")

    triggers.webhook(app, "orders", workflow="order", secret_env="ORDERS_HOOK_SECRET")
    triggers.webhook(
        app, "approved", mode="signal", signal="approved", secret_file=secret_file, max_body=200
    )
    triggers.webhook(app, "strict", workflow=order, secret_env="ORDERS_HOOK_SECRET", tolerance=10)
    triggers.webhook(app, "unset", workflow="order", secret_env="FLOWDESK_TEST_NO_SUCH_SECRET")


@dataclass
class Env:
    app: flowdesk.App
    client: httpx.AsyncClient
    api: Any

    async def send(
        self,
        hook: str,
        payload: Any,
        *,
        delivery: str | None = None,
        secret: str = SECRET,
        timestamp: int | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> httpx.Response:
        body = raw if raw is not None else json.dumps(payload).encode()
        signed = wh.signed_headers(secret, body, delivery or uuid.uuid4().hex, timestamp)
        signed.update(headers or {})
        return await self.client.post(f"/hooks/{hook}", content=body, headers=signed)


def _client(api: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://hooks.test")


@pytest.fixture
async def env(app, tmp_path, monkeypatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("ORDERS_HOOK_SECRET", SECRET)
    monkeypatch.delenv("FLOWDESK_TEST_NO_SUCH_SECRET", raising=False)
    (tmp_path / "approved.secret").write_text("old-secret\nnew-secret\n")
    register(app, tmp_path / "approved.secret")
    async with app:
        api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
        async with _client(api) as client, app.worker(concurrency=10):
            yield Env(app, client, api)


def error(r: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["error"] == name, body
    return body


ORDER = {"order_id": "A-17", "items": [3, 4]}


async def _runs(app: flowdesk.App) -> list[flowdesk.Run]:
    return (await app.list_runs(limit=100)).items


# -- Must show 4: a signed delivery starts one run; a replay returns it ------------------------


async def test_a_signed_delivery_starts_a_run_keyed_by_its_delivery_id(env, wait_status, query):
    r = await env.send("orders", ORDER, delivery="dlv-1")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {
        "hook": "orders",
        "delivery_id": "dlv-1",
        "mode": "start",
        "run_id": body["run_id"],
        "replay": False,
    }
    assert wh.REPLAY_HEADER not in r.headers
    run = await wait_status(env.app, body["run_id"], RunStatus.SUCCEEDED)
    assert run.idempotency_key == "webhook:orders:dlv-1"
    assert run.input == ORDER and run.output == {"order_id": "A-17", "total": 7}
    rows = query("SELECT hook, delivery_id, mode, run_id FROM webhook_deliveries")
    assert rows == [("orders", "dlv-1", "start", body["run_id"])]
    log = audit_log.AuditLog(env.app)
    records = [rec async for rec in log.rows(subject="hook:orders")]
    assert [rec["action"] for rec in records] == ["webhook.received"]
    assert records[0]["actor"] == "system:webhook:orders"
    assert records[0]["data"]["delivery_id"] == "dlv-1"
    started = [rec async for rec in log.rows(subject=f"run:{body['run_id']}")][0]
    assert started["action"] == "run.started" and started["data"]["initiator"] is None


async def test_a_replayed_delivery_answers_200_with_the_same_run(env):
    first = await env.send("orders", ORDER, delivery="dlv-2")
    assert first.status_code == 201
    for _ in range(2):  # the sender retries, signing again with a new timestamp
        again = await env.send("orders", ORDER, delivery="dlv-2")
        assert again.status_code == 200, again.text
        assert again.headers[wh.REPLAY_HEADER] == "true"
        assert again.json()["run_id"] == first.json()["run_id"]
        assert again.json()["replay"] is True
    assert len(await _runs(env.app)) == 1


async def test_a_replay_with_another_body_is_refused(env, query):
    first = await env.send("orders", ORDER, delivery="dlv-3")
    assert first.status_code == 201
    other = {**ORDER, "items": [100]}
    body = error(await env.send("orders", other, delivery="dlv-3"), 409, "DeliveryConflict")
    assert "another body" in body["message"] and "dlv-3" in body["message"]
    # the same JSON, other bytes: still another body
    spaced = json.dumps(ORDER, indent=2).encode()
    error(await env.send("orders", None, raw=spaced, delivery="dlv-3"), 409, "DeliveryConflict")
    assert len(await _runs(env.app)) == 1
    assert query("SELECT COUNT(*) FROM webhook_deliveries") == [(1,)]


async def test_a_captured_request_resent_under_another_delivery_id_is_refused(env):
    body = json.dumps(ORDER).encode()
    headers = wh.signed_headers(SECRET, body, "dlv-4")
    first = await env.client.post("/hooks/orders", content=body, headers=headers)
    assert first.status_code == 201
    stolen = {**headers, wh.DELIVERY_HEADER: "dlv-forged"}
    r = await env.client.post("/hooks/orders", content=body, headers=stolen)
    assert "already delivered as 'dlv-4'" in error(r, 409, "DeliveryConflict")["message"]
    assert len(await _runs(env.app)) == 1


async def test_concurrent_copies_of_one_delivery_start_one_run(env):
    body = json.dumps(ORDER).encode()
    headers = wh.signed_headers(SECRET, body, "dlv-5")
    answers = await asyncio.gather(
        *(env.client.post("/hooks/orders", content=body, headers=headers) for _ in range(6))
    )
    assert sorted(r.status_code for r in answers) == [200] * 5 + [201], [r.text for r in answers]
    assert len({r.json()["run_id"] for r in answers}) == 1
    assert len(await _runs(env.app)) == 1


async def test_the_delivery_memory_survives_a_restart(env, make_app, tmp_path):
    first = await env.send("orders", ORDER, delivery="dlv-6")
    assert first.status_code == 201
    # Another server process on the same database: it knows the delivery.
    other = make_app()
    register(other, tmp_path / "approved.secret")
    api = server.create_app(other, audit=audit_log.AuditLog(other, tmp_path / "other.key"))
    async with other, _client(api) as client:
        body = json.dumps(ORDER).encode()
        r = await client.post(
            "/hooks/orders", content=body, headers=wh.signed_headers(SECRET, body, "dlv-6")
        )
        assert r.status_code == 200 and r.json()["run_id"] == first.json()["run_id"]
    assert len(await _runs(env.app)) == 1


# -- Must show 4: what is refused ---------------------------------------------------------------


async def test_missing_and_wrong_signatures_are_refused_with_401(env):
    body = json.dumps(ORDER).encode()
    good = wh.signed_headers(SECRET, body, "dlv-7")
    cases: dict[str, dict[str, str]] = {
        "no signature": {k: v for k, v in good.items() if k != wh.SIGNATURE_HEADER},
        "no timestamp": {k: v for k, v in good.items() if k != wh.TIMESTAMP_HEADER},
        "wrong secret": wh.signed_headers("not-the-secret", body, "dlv-7"),
        "other timestamp": {**good, wh.TIMESTAMP_HEADER: str(int(good[wh.TIMESTAMP_HEADER]) - 1)},
        "other scheme": {
            **good,
            wh.SIGNATURE_HEADER: good[wh.SIGNATURE_HEADER].replace("v1", "v0"),
        },
        "truncated": {**good, wh.SIGNATURE_HEADER: good[wh.SIGNATURE_HEADER][:-2]},
        "not a number": {**good, wh.TIMESTAMP_HEADER: "soon"},
        "not ascii": {**good, wh.SIGNATURE_HEADER: "v1=\u00e9\u00e9".encode("latin-1")},
    }
    for label, headers in cases.items():
        r = await env.client.post("/hooks/orders", content=body, headers=headers)
        assert r.status_code == 401, (label, r.text)
        assert r.json()["error"] == "BadSignature", label
    tampered = json.dumps({**ORDER, "items": [999]}).encode()
    r = await env.client.post("/hooks/orders", content=tampered, headers=good)
    assert "does not verify" in error(r, 401, "BadSignature")["message"]
    # An API token is no credential here, whoever it belongs to.
    await identity.Identity(env.app).create_user("root", roles=["admin"])
    token = (await identity.Identity(env.app).create_token("root"))[1]
    r = await env.client.post(
        "/hooks/orders",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    error(r, 401, "BadSignature")
    assert await _runs(env.app) == []


async def test_stale_and_future_timestamps_are_refused_with_a_clear_message(env):
    now = int(time.time())
    old = await env.send("orders", ORDER, timestamp=now - 400)
    message = error(old, 401, "StaleDelivery")["message"]
    assert "old" in message and "within 300 s" in message and "clock" in message
    ahead = await env.send("orders", ORDER, timestamp=now + 400)
    assert "in the future" in error(ahead, 401, "StaleDelivery")["message"]
    assert (await env.send("orders", ORDER, timestamp=now - 250)).status_code == 201
    # A hook's own tolerance.
    error(await env.send("strict", ORDER, timestamp=now - 60), 401, "StaleDelivery")
    assert (await env.send("strict", ORDER, timestamp=now - 2)).status_code == 201
    assert len(await _runs(env.app)) == 2


def test_the_tolerance_applies_both_ways_at_its_edge():
    app = flowdesk.App("sqlite:///:memory:")

    @app.workflow("noop")
    async def noop(ctx: flowdesk.Context) -> None:
        return None

    hook = triggers.webhook(app, "edge", workflow="noop", secret_env="X", tolerance=300)
    body = b"{}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("X", "k")
        for skew, ok in ((300, True), (-300, True), (301, False), (-301, False)):
            ts = 1_000_000 - skew
            signature = wh.sign("k", ts, body)
            if ok:
                hook.verify(body, str(ts), signature, now=1_000_000)
            else:
                with pytest.raises(errors.StaleDelivery):
                    hook.verify(body, str(ts), signature, now=1_000_000)


async def test_unknown_hooks_bad_bodies_and_missing_secrets(env):
    error(await env.send("nope", ORDER), 404, "UnknownHook")
    body = error(await env.send("orders", {"order_id": "x"}), 422, "InvalidInput")
    assert [e["field"] for e in body["errors"]] == ["items"]
    error(await env.send("orders", None, raw=b"{not json"), 422, "InvalidInput")
    error(await env.send("orders", None, raw=b'{"order_id": NaN}'), 422, "InvalidInput")
    surrogate = b'{"order_id": "\\ud800", "items": []}'
    error(await env.send("orders", None, raw=surrogate), 422, "InvalidInput")
    no_delivery = json.dumps(ORDER).encode()
    headers = wh.signed_headers(SECRET, no_delivery, "x")
    del headers[wh.DELIVERY_HEADER]
    r = await env.client.post("/hooks/orders", content=no_delivery, headers=headers)
    assert error(r, 422, "InvalidInput")["errors"][0]["field"] == "header.X-Flowdesk-Delivery"
    big = {"run_id": "r", "pad": "x" * 300}  # the hook takes at most 200 bytes
    error(await env.send("approved", big, secret="new-secret"), 413, "PayloadTooLarge")
    unset = error(await env.send("unset", ORDER), 503, "SecretUnavailable")
    assert "FLOWDESK_TEST_NO_SUCH_SECRET" in unset["message"]
    assert await _runs(env.app) == []


# -- signal mode, key rotation -------------------------------------------------------------------


async def test_signal_mode_wakes_the_named_run_once(env, wait_status):
    run = await env.app.start("waiter")
    await wait_status(env.app, run.id, RunStatus.WAITING)
    payload = {"run_id": run.id, "by": "anna"}
    r = await env.send("approved", payload, secret="new-secret", delivery="sig-1")
    assert r.status_code == 202, r.text
    assert r.json()["mode"] == "signal" and r.json()["run_id"] == run.id
    done = await wait_status(env.app, run.id, RunStatus.SUCCEEDED)
    assert done.output == payload
    again = await env.send("approved", payload, secret="old-secret", delivery="sig-1")
    assert again.status_code == 200 and again.headers[wh.REPLAY_HEADER] == "true"
    # A new delivery for the finished run, or for no run at all.
    late = {"run_id": run.id, "by": "bob"}
    error(await env.send("approved", late, secret="new-secret"), 409, "InvalidState")
    missing = {"run_id": "no-such-run"}
    error(await env.send("approved", missing, secret="new-secret"), 404, "RunNotFound")
    body = error(await env.send("approved", {"by": "x"}, secret="new-secret"), 422, "InvalidInput")
    assert body["errors"][0]["field"] == "body.run_id"


async def test_every_listed_secret_and_signature_is_accepted_during_a_rotation(env, wait_status):
    runs = [await env.app.start("waiter") for _ in range(3)]
    body = json.dumps({"run_id": runs[0].id}).encode()
    headers = wh.signed_headers("old-secret", body, "rot-1")
    assert (await env.client.post("/hooks/approved", content=body, headers=headers)).is_success
    body = json.dumps({"run_id": runs[1].id}).encode()
    headers = wh.signed_headers("new-secret", body, "rot-2")
    wrong = wh.sign("retired", headers[wh.TIMESTAMP_HEADER], body)
    headers[wh.SIGNATURE_HEADER] = f"{wrong}, {headers[wh.SIGNATURE_HEADER]}"
    assert (await env.client.post("/hooks/approved", content=body, headers=headers)).is_success
    body = json.dumps({"run_id": runs[2].id}).encode()
    headers = wh.signed_headers("retired", body, "rot-3")
    error(
        await env.client.post("/hooks/approved", content=body, headers=headers), 401, "BadSignature"
    )


# -- registration -------------------------------------------------------------------------------


def test_registration_is_checked():
    app = flowdesk.App("sqlite:///:memory:")

    @app.workflow("noop")
    async def noop(ctx: flowdesk.Context) -> None:
        return None

    bad: list[dict[str, Any]] = [
        {"name": "no secret", "workflow": "noop"},
        {"name": "ok", "workflow": "noop"},
        {"name": "ok", "workflow": "noop", "secret_env": "A", "secret_file": "/x"},
        {"name": "ok", "workflow": None, "secret_env": "A"},
        {"name": "ok", "workflow": "noop", "secret_env": "A", "mode": "poll"},
        {"name": "ok", "workflow": "noop", "secret_env": "A", "tolerance": 0},
        {"name": "ok", "mode": "signal", "signal": "flowdesk.task", "secret_env": "A"},
    ]
    for kwargs in bad:
        name = kwargs.pop("name")
        with pytest.raises(errors.ConfigurationError):
            triggers.webhook(app, name, **kwargs)
    with pytest.raises(errors.UnknownWorkflow):
        triggers.webhook(app, "ok", workflow="missing", secret_env="A")
    hook = triggers.webhook(app, "ok", workflow=noop, secret_env="A")
    assert hook.workflow == "noop" and triggers.webhook(app, "ok", workflow="noop", secret_env="A")
    with pytest.raises(errors.ConfigurationError):
        triggers.webhook(app, "ok", workflow="noop", secret_env="B")
    assert [h.name for h in triggers.hooks_of(app)] == ["ok"]
    assert len(triggers.hooks_of(flowdesk.App("sqlite:///:memory:"))) == 0


def test_the_triggers_package_exports_are_pinned():
    assert triggers.__all__ == sorted(triggers.__all__)
    assert triggers.__all__ == [
        "DroppedFile",
        "FileDrop",
        "Message",
        "StreamConsumer",
        "Webhook",
        "hooks_of",
        "sign",
        "signed_headers",
        "webhook",
    ]
    assert all(hasattr(triggers, name) for name in triggers.__all__)
