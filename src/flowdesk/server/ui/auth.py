"""Web sign-in: sessions in a signed cookie, with their state and expiry on the server.

The ``flowdesk_session`` cookie holds ``<secret>.<signature>``: 256 random bits and their
HMAC-SHA256 under the server's session key. The store keeps only the SHA-256 of the
secret, with the user, the session's CSRF token and its expiry, so:

* a forged or altered cookie fails the signature before the store is asked;
* a copied database opens no session (it holds no secret);
* the server alone decides when a session ends: at its expiry, at sign-out, when the
  user's password changes, or when the user is disabled, whatever the browser keeps.

The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Lax`` (other sites' forms
do not carry it) and ``Secure`` except on plain HTTP to a loopback address (a developer's
own machine). Every POST form also carries the session's CSRF token, compared in
constant time. The sign-in form, before any session exists, is protected the same way by
a short-lived signed token of its own (double submit: cookie and form field).

Failed sign-ins are throttled per account and per client address, in the store
(`flowdesk.server.ui.throttle`): past its limit, an account or address is refused
without its password being checked, for a lockout that grows with each failure.

The session key comes from ``create_app(session_key=...)``, else ``$FLOWDESK_SESSION_KEY``;
without either, each process makes a random one (sessions then end when it restarts,
and several API servers need the same key set).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.governance import identity as ident
from flowdesk.server.ui import throttle
from flowdesk.store import base, people, sql_ui

COOKIE = "flowdesk_session"
LOGIN_COOKIE = "flowdesk_signin"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_TTL_S = 3600
PRUNE_AFTER_MS = 7 * 24 * 3600 * 1000  # ended or expired sessions are forgotten a week later


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def session_key(given: str | bytes | None) -> bytes:
    """The key that signs cookies: ``given``, else $FLOWDESK_SESSION_KEY, else random."""
    value = given if given is not None else os.environ.get("FLOWDESK_SESSION_KEY")
    if value is None:
        return secrets.token_bytes(32)
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if len(raw) < 16:
        raise errors.ConfigurationError(
            "The session key is too short: use at least 16 random bytes "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    return raw


def secure_request(request: Request) -> bool:
    """Should cookies be ``Secure``? Yes, unless plain HTTP to a loopback host."""
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def cookie_path(request: Request) -> str:
    """Where the UI is mounted (``/ui``, or under a proxy's prefix): cookies go nowhere else."""
    return str(request.scope.get("root_path") or "/ui")


@dataclass(frozen=True, slots=True)
class Session:
    user: people.UserRecord
    csrf: str
    expires_at: int


class Sessions:
    """Sign-in sessions of one app's store."""

    def __init__(
        self,
        app: App,
        key: bytes,
        lifetime: timedelta = timedelta(hours=8),
        limits: throttle.Limits | None = None,
    ) -> None:
        if lifetime <= timedelta(0):
            raise errors.ConfigurationError("A session's lifetime must be positive.")
        self.app = app
        self.key = key
        self.lifetime = lifetime
        self.identity = ident.Identity(app)
        self.throttle = throttle.Throttle(app, limits)

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self.key, text.encode("ascii"), hashlib.sha256).digest())

    def _unsign(self, value: str | None) -> str | None:
        if not value or value.count(".") != 1 or len(value) > 200:
            return None
        text, signature = value.split(".")
        if not hmac.compare_digest(self._sign(text), signature):
            return None
        return text

    async def sign_in(
        self, user_id: str, password: str, address: str | None = None
    ) -> tuple[str, Session]:
        """Check the password and open a session: the cookie value and the session.

        ``address`` is the client's. `SignInThrottled` (an `Unauthenticated`) refuses
        without checking the password while the account or the address is locked out,
        and answers the failure that locks one out.
        """
        async with self.throttle.turn(user_id, address):
            await self.throttle.check(user_id, address)
            try:
                user = await self.identity.check_password(user_id, password)
            except errors.Unauthenticated:
                locked = await self.throttle.failed(user_id, address)
                if locked is not None:
                    raise locked from None
                raise
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        expires = base.now_ms() + int(self.lifetime.total_seconds() * 1000)
        hashed = ident.hash_secret(secret)

        async def start(tx: base.Tx) -> None:
            sessions = sql_ui.ui_tx(tx)
            await sessions.prune_sessions(base.now_ms() - PRUNE_AFTER_MS)  # keeps it small
            await sessions.start_session(hashed, user.id, csrf, expires)
            await self.throttle.succeeded_txn(tx, user_id)

        await self.app.submit(start, actor=user.id)
        return f"{secret}.{self._sign(secret)}", Session(user, csrf, expires)

    async def resolve(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None (forged, unknown, ended, expired, or
        its user disabled)."""
        secret = self._unsign(cookie)
        if secret is None:
            return None
        await self.app.open()
        found = await sql_ui.ui_store(self.app.store).session(ident.hash_secret(secret))
        if found is None or found.ended_at is not None or found.expires_at <= base.now_ms():
            return None
        user = await self.app.store.get_user(found.user_id)
        if user is None or user.disabled:
            return None
        return Session(user, found.csrf, found.expires_at)

    async def sign_out(self, cookie: str | None) -> None:
        secret = self._unsign(cookie)
        if secret is not None:
            hashed = ident.hash_secret(secret)
            await self.app.submit(lambda tx: sql_ui.ui_tx(tx).end_session(hashed))

    # -- the sign-in form's own CSRF token (no session yet) -------------------------------
    def login_token(self) -> str:
        text = f"{secrets.token_urlsafe(18)}~{int(time.time()) + LOGIN_TTL_S}"
        return f"{text}.{self._sign(text)}"

    def login_token_ok(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or not hmac.compare_digest(cookie, field):
            return False
        text = self._unsign(cookie)
        if text is None or "~" not in text:
            return False
        expiry = text.rsplit("~", 1)[1]
        return expiry.isdigit() and int(expiry) > time.time()

    def set_cookie(self, request: Request, response: Response, name: str, value: str) -> None:
        max_age = int(self.lifetime.total_seconds()) if name == COOKIE else LOGIN_TTL_S
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=cookie_path(request),
            httponly=True,
            samesite="lax",
            secure=secure_request(request),
        )

    def clear_cookie(self, request: Request, response: Response, name: str) -> None:
        response.delete_cookie(
            name,
            path=cookie_path(request),
            httponly=True,
            samesite="lax",
            secure=secure_request(request),
        )


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf, sent or "")
