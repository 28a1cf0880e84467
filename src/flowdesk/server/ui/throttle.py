"""Throttling of failed web sign-ins, per account and per client address.

Each failed sign-in counts against two keys: the account that was tried (whether it
exists or not, so a refusal never tells who has an account) and the client's address
(an IPv6 address by its /64, which one client usually holds whole). When a key reaches
its limit of failures in a row (`Limits`: 5 per account, 20 per address), sign-ins to it
are refused for a lockout, without checking the password: 30 s at first, doubled by
each further failure, at most 15 minutes. A refusal answers HTTP 429 with
``Retry-After``. Refused attempts count nothing, so they never lengthen a lockout.

A streak is forgotten one window (15 minutes) after its first failure, or after its
latest lockout ends. A successful sign-in also ends its account's streak; the address's
streak goes on, so a client that owns one account cannot sign in with it between
guesses at others to start over.

The counters live in the store (schema 10, ``ui_signin_failures``), so every API server
on one database counts the same failures and honours the same lockouts. Within a server,
sign-ins of one account, or from one address, take turns (`Throttle.turn`): a burst of
guesses sent at once cannot all pass the check before the first failure is counted, so
N servers run at most N password checks of one account or address at a time.

Each lockout is logged (a warning of ``flowdesk.server.ui.signin``; one JSON line with
the request's context under `flowdesk.observe.logs.configure("json")`). Failed sign-ins
are not audit records: the audit chain records changes, and anyone could add to it by
guessing.

The address is the one the ASGI server reports. Behind a reverse proxy that is the
proxy's, unless the server takes the client's from ``X-Forwarded-For`` (uvicorn does so
for proxies listed in ``$FORWARDED_ALLOW_IPS``, by default the loopback addresses); where
it cannot, set ``address_failures=None``, or everyone behind the proxy shares one limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import base, sql_ui

log = logging.getLogger("flowdesk.server.ui.signin")

MAX_KEY_CHARS = 200  # longer user ids (none is valid past 64) share one counter


def _ms(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """When failed sign-ins lock an account or a client address out.

    Attributes:
        account_failures: failures in a row of one account (known or not) that lock it.
        address_failures: failures in a row from one client address, whatever the
            accounts, that lock it; None counts none (every client seems to come from
            one address, say, behind a proxy that hides theirs).
        window: how long a streak of failures is remembered: from its first failure, or
            from the end of its latest lockout.
        lockout: the first lockout; each further failure doubles it.
        max_lockout: the longest lockout.
    """

    account_failures: int = 5
    address_failures: int | None = 20
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(seconds=30)
    max_lockout: timedelta = timedelta(minutes=15)

    def __post_init__(self) -> None:
        counts = [self.account_failures]
        if self.address_failures is not None:
            counts.append(self.address_failures)
        if any(n < 1 for n in counts):
            raise errors.ConfigurationError(
                f"Sign-in limits must allow at least 1 failure (account_failures="
                f"{self.account_failures}, address_failures={self.address_failures})."
            )
        if _ms(self.lockout) < 1000 or self.max_lockout < self.lockout:
            raise errors.ConfigurationError(
                f"A sign-in lockout must last 1 s or more, and max_lockout ({self.max_lockout})"
                f" may not be shorter than lockout ({self.lockout})."
            )
        if _ms(self.window) < 1000:
            raise errors.ConfigurationError(
                f"The sign-in window ({self.window}) must be 1 s or more."
            )

    def lockout_ms(self, beyond: int) -> int:
        """The lockout after ``beyond`` failures past the limit (0: the limit itself)."""
        doublings = min(max(beyond, 0), 40)  # 2**40 lockouts exceed any cap
        return min(_ms(self.max_lockout), _ms(self.lockout) << doublings)


def account_key(user_id: str) -> str:
    """What one account's failures count under (tried ids that exist or not alike)."""
    return "user:" + user_id[:MAX_KEY_CHARS]


def address_key(host: str) -> str:
    """What one client's address counts under: an IPv4 address as it is (also when
    mapped into IPv6), an IPv6 address by its /64 network, anything else as given."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "addr:" + host[:MAX_KEY_CHARS]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "addr:" + str(ip.ipv4_mapped)
        return "addr:" + str(ipaddress.IPv6Network((ip, 64), strict=False))
    return "addr:" + str(ip)


def _seconds(ms: int) -> int:
    """Whole seconds to wait (rounded up, at least 1), as ``Retry-After`` says them."""
    return max(1, -(-ms // 1000))


class Throttle:
    """Failed sign-ins of one app's store, counted under `Limits`; ``clock`` gives now
    in epoch ms."""

    def __init__(
        self,
        app: App,
        limits: Limits | None = None,
        clock: Callable[[], int] = base.now_ms,
    ) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.clock = clock
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}  # key: (lock, its holders)

    def _keys(self, user_id: str, address: str | None) -> list[tuple[str, int]]:
        """The keys an attempt counts under, with their limits. Always in this order
        ("addr:" before "user:"), so servers lock the same rows in the same order."""
        keys: list[tuple[str, int]] = []
        if address is not None and self.limits.address_failures is not None:
            keys.append((address_key(address), self.limits.address_failures))
        keys.append((account_key(user_id), self.limits.account_failures))
        return keys

    @contextlib.asynccontextmanager
    async def turn(self, user_id: str, address: str | None) -> AsyncIterator[None]:
        """Wait until no other sign-in of this account or from this address runs in
        this process, and hold both until the block ends."""
        async with contextlib.AsyncExitStack() as stack:
            for key, _ in self._keys(user_id, address):  # one order: no deadlock
                await stack.enter_async_context(self._turn(key))
            yield

    @contextlib.asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        lock, holders = self._turns.get(key) or (asyncio.Lock(), 0)
        self._turns[key] = (lock, holders + 1)
        try:
            async with lock:
                yield
        finally:
            lock, holders = self._turns[key]
            if holders == 1:
                del self._turns[key]  # only keys in use are kept
            else:
                self._turns[key] = (lock, holders - 1)

    async def check(self, user_id: str, address: str | None) -> None:
        """`SignInThrottled` while the account or the address is locked out."""
        await self.app.open()
        now = self.clock()
        keys = [key for key, _ in self._keys(user_id, address)]
        until = await sql_ui.ui_store(self.app.store).signin_locked_until(keys, now)
        if until:
            raise errors.SignInThrottled(_seconds(until - now))

    async def failed(self, user_id: str, address: str | None) -> errors.SignInThrottled | None:
        """Count a failed sign-in; the refusal to answer with when it locked a key out."""
        now = self.clock()
        window = _ms(self.limits.window)
        keys = self._keys(user_id, address)

        async def count(tx: base.Tx) -> list[tuple[str, int, int]]:
            ui = sql_ui.ui_tx(tx)
            await ui.prune_signin_failures(now)  # keeps the table small
            locked: list[tuple[str, int, int]] = []
            for key, limit in keys:
                failures = await ui.count_signin_failure(key, now, now + window)
                if failures >= limit:
                    until = now + self.limits.lockout_ms(failures - limit)
                    await ui.lock_signin(key, until, until + window)
                    locked.append((key, failures, until))
            return locked

        locked = await self.app.submit(count)
        for key, failures, until in locked:
            log.warning(
                "Sign-in locked out for %d s after %d failed sign-ins in a row: %r",
                _seconds(until - now),
                failures,
                key,
            )
        if not locked:
            return None
        return errors.SignInThrottled(_seconds(max(until for _, _, until in locked) - now))

    async def succeeded_txn(self, tx: base.Tx, user_id: str) -> None:
        """End the account's streak, in the caller's transaction (the one that opens the
        session)."""
        await sql_ui.ui_tx(tx).clear_signin_failures(account_key(user_id))
