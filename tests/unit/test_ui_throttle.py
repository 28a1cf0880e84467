"""Throttling of failed web sign-ins (`flowdesk.server.ui.throttle`), over HTTP in process
on both stores: per account and per client address, lockouts that double, resets, and
lockouts that hold across API servers on one database. Time is a fake clock that the
tests move; nothing sleeps."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest

import flowdesk
from flowdesk import errors
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.observe import logs
from flowdesk.server import app as server
from flowdesk.server.ui import throttle
from flowdesk.store import base

BASE = "https://flowdesk.test"
PASSWORD = "correct horse battery"
KEY = "test-session-key-0123456789"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_ERROR = re.compile(r'id="login-error">([^<]*)<')
HERE, THERE = "192.0.2.10", "198.51.100.7"
TOO_MANY = "Too many failed sign-ins; try again in {} seconds."


class Clock:
    """Epoch ms that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = base.now_ms()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


@dataclass
class Server:
    api: Any
    checks: list[str]  # user ids whose password was checked

    def client(self, address: str = HERE) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.api, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url=BASE, follow_redirects=False)

    async def sign_in(
        self, user: str, password: str = PASSWORD, address: str = HERE
    ) -> httpx.Response:
        async with self.client(address) as client:
            form = await client.get("/ui/login")
            found = _CSRF.search(form.text)
            assert form.status_code == 200 and found
            return await client.post(
                "/ui/login",
                data={"user": user, "password": password, "csrf": html.unescape(found[1])},
            )


def error_of(r: httpx.Response) -> str:
    found = _ERROR.search(r.text)
    return html.unescape(found[1]) if found else ""


def refused(r: httpx.Response, seconds: int) -> bool:
    """A lockout's answer: 429, Retry-After, the message, and no session."""
    return (
        r.status_code == 429
        and r.headers.get("retry-after") == str(seconds)
        and error_of(r) == TOO_MANY.format(seconds)
        and "flowdesk_session=" not in r.headers.get("set-cookie", "")
    )


@pytest.fixture
async def opened(app: flowdesk.App) -> AsyncIterator[flowdesk.App]:
    async with app:
        ids = identity.Identity(app)
        for uid in ("anna", "bob"):
            await ids.create_user(uid, roles=["approver"])
            await ids.set_password(uid, PASSWORD)
        yield app


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_server(tmp_path, clock) -> Callable[..., Server]:
    """An API server (a `create_app`) of an app, its sign-in throttle on the test's clock."""

    def make(app: flowdesk.App, **limits: Any) -> Server:
        api = server.create_app(
            app,
            audit=audit_log.AuditLog(app, tmp_path / "audit.key"),
            session_key=KEY,
            signin_limits=throttle.Limits(**limits),
        )
        ui = next(r for r in api.routes if getattr(r, "name", "") == "ui").app.state.ui
        ui.sessions.throttle.clock = clock
        checks: list[str] = []
        check_password = ui.sessions.identity.check_password

        async def counted(user_id: str, password: str) -> Any:
            checks.append(user_id)
            return await check_password(user_id, password)

        ui.sessions.identity.check_password = counted
        return Server(api, checks)

    return make


async def test_the_nth_failure_locks_the_account_for_a_lockout_that_doubles(
    opened, make_server, clock, caplog
):
    site = make_server(opened)
    caplog.set_level(logging.WARNING, logger="flowdesk.server.ui.signin")
    for _ in range(4):
        r = await site.sign_in("anna", "wrong password")
        assert r.status_code == 401 and error_of(r) == "Unknown user or wrong password."
    r = await site.sign_in("anna", "wrong password")  # the 5th locks the account
    assert refused(r, 30), (r.status_code, r.headers, error_of(r))

    checked = len(site.checks)
    r = await site.sign_in("anna")  # the right password, refused unchecked
    assert refused(r, 30)
    clock.advance(29)
    assert refused(await site.sign_in("anna"), 1)
    assert len(site.checks) == checked  # never asked argon2 while locked out

    clock.advance(1)  # over: the next failure locks it again, twice as long
    assert refused(await site.sign_in("anna", "wrong password"), 60)
    clock.advance(60)
    assert refused(await site.sign_in("anna", "wrong again"), 120)
    assert (await site.sign_in("bob")).status_code == 303  # others still sign in

    clock.advance(120)  # the right password after the lockout: a session, and a reset
    ok = await site.sign_in("anna")
    assert ok.status_code == 303 and "flowdesk_session=" in ok.headers["set-cookie"]
    for _ in range(4):
        assert (await site.sign_in("anna", "wrong password")).status_code == 401
    assert refused(await site.sign_in("anna", "wrong password"), 30)  # from 30 s again

    lines = [r for r in caplog.records if r.name == "flowdesk.server.ui.signin"]
    assert [r.getMessage() for r in lines][:2] == [
        "Sign-in locked out for 30 s after 5 failed sign-ins in a row: 'user:anna'",
        "Sign-in locked out for 60 s after 6 failed sign-ins in a row: 'user:anna'",
    ]
    assert json.loads(logs.JsonFormatter().format(lines[0]))["level"] == "WARNING"


async def test_a_lockout_grows_to_its_cap_and_streaks_end_after_the_window(
    opened, make_server, clock
):
    site = make_server(opened, account_failures=2, max_lockout=timedelta(seconds=100))
    await site.sign_in("anna", "wrong password")
    for seconds in (30, 60, 100, 100):
        assert refused(await site.sign_in("anna", "wrong password"), seconds)
        clock.advance(seconds)
    clock.advance(15 * 60)  # a window after the lockout ended: the streak is forgotten
    assert (await site.sign_in("anna", "wrong password")).status_code == 401
    clock.advance(15 * 60)  # a window after the streak began, too
    assert (await site.sign_in("anna", "wrong password")).status_code == 401
    assert refused(await site.sign_in("anna", "wrong password"), 30)


async def test_an_unknown_user_is_counted_and_refused_the_same_way(opened, make_server):
    site = make_server(opened)
    answers: dict[str, list[tuple[int, str | None, str]]] = {}
    for user in ("anna", "nobody"):
        answers[user] = []
        for _ in range(6):
            r = await site.sign_in(user, "wrong password")
            answers[user].append((r.status_code, r.headers.get("retry-after"), error_of(r)))
    assert answers["anna"] == answers["nobody"]
    assert [a[0] for a in answers["nobody"]] == [401] * 4 + [429] * 2


async def test_one_address_cannot_spray_many_accounts(opened, make_server, clock):
    site = make_server(opened, address_failures=4)
    for user in ("anna", "bob", "carl"):
        assert (await site.sign_in(user, "wrong password")).status_code == 401
    assert refused(await site.sign_in("dora", "wrong password"), 30)  # the 4th: any accounts
    assert refused(await site.sign_in("anna"), 30)  # from here, even the right password
    assert (await site.sign_in("anna", address=THERE)).status_code == 303  # not from there

    clock.advance(30)
    assert (await site.sign_in("bob")).status_code == 303  # over; a success here
    # ...does not end the address's streak: one own account cannot reset the count
    assert refused(await site.sign_in("carl", "wrong password"), 60)

    v6 = make_server(opened, address_failures=2)
    assert (await v6.sign_in("erin", "wrong", address="2001:db8::1")).status_code == 401
    assert refused(await v6.sign_in("fred", "wrong", address="2001:db8::2"), 30)  # one /64
    assert (await v6.sign_in("anna", address="2001:db8:0:1::1")).status_code == 303


async def test_a_burst_of_guesses_at_once_gets_no_more_checks_than_the_limit(opened, make_server):
    site = make_server(opened, address_failures=6)
    answers = await asyncio.gather(*(site.sign_in("anna", f"guess {i}") for i in range(8)))
    assert sorted(r.status_code for r in answers) == [401] * 4 + [429] * 4
    assert site.checks == ["anna"] * 5  # the 5th locked the account; the rest waited

    spray = await asyncio.gather(
        *(site.sign_in(f"user{i}", "guess", address=THERE) for i in range(10))
    )
    assert sorted(r.status_code for r in spray) == [401] * 5 + [429] * 5
    assert len(site.checks) == 5 + 6


async def test_a_lockout_holds_across_servers_on_one_database(opened, make_app, make_server):
    other = make_app()
    async with other:
        one, two = make_server(opened), make_server(other)
        for site in (one, two, one, two):
            assert (await site.sign_in("anna", "wrong password")).status_code == 401
        assert refused(await one.sign_in("anna", "wrong password"), 30)
        checked = len(two.checks)
        assert refused(await two.sign_in("anna"), 30)  # the other server refuses it too
        assert len(two.checks) == checked


def test_limits_are_checked_and_lockouts_double_up_to_the_cap():
    limits = throttle.Limits()
    assert [limits.lockout_ms(n) // 1000 for n in range(7)] == [30, 60, 120, 240, 480, 900, 900]
    assert limits.lockout_ms(10_000) == 900_000
    for bad in (
        {"account_failures": 0},
        {"address_failures": 0},
        {"lockout": timedelta(0)},
        {"lockout": timedelta(minutes=2), "max_lockout": timedelta(minutes=1)},
        {"window": timedelta(0)},
    ):
        with pytest.raises(errors.ConfigurationError):
            throttle.Limits(**bad)
    assert throttle.Limits(address_failures=None).address_failures is None
    assert throttle.address_key("::ffff:192.0.2.1") == "addr:192.0.2.1"
    assert throttle.address_key("2001:db8::1") == throttle.address_key("2001:db8::ffff")
    assert throttle.address_key("2001:db8::1") != throttle.address_key("2001:db8:0:1::1")
