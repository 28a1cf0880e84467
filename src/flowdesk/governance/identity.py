"""Users, roles and API tokens.

A token is shown once, when it is created, and stored only as its SHA-256 hash: the
secret has 256 random bits, so a fast hash is enough (no one can guess it, and a stolen
database does not reveal it). Each token belongs to one user, whose roles and groups
decide what the token may do.

A password (for signing in to the web UI) is chosen by a person, so it is stored as an
argon2id hash (slow and memory-hard by design; `argon2.PasswordHasher`'s parameters).

Roles and what they allow:

============  ==========================================================
``admin``     everything, including users, tokens and audit checkpoints
``operator``  runs (start, signal, cancel, retry), every task (read, act), audit
``approver``  tasks they are a candidate for (read, claim, complete, ...)
``viewer``    read runs, and read the tasks they are a candidate for
============  ==========================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import argon2

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import base, sql_ui
from flowdesk.store.people import ROLES, TokenRecord, UserRecord

PERMISSIONS: dict[str, frozenset[str]] = {
    "runs:read": frozenset({"admin", "operator", "viewer"}),
    "runs:write": frozenset({"admin", "operator"}),
    "tasks:read": frozenset({"admin", "operator", "approver", "viewer"}),
    "tasks:act": frozenset({"admin", "operator", "approver"}),
    "audit:read": frozenset({"admin", "operator"}),
    "audit:write": frozenset({"admin"}),
    "users:admin": frozenset({"admin"}),
    # decrypted payloads (inputs, results, signals, forms) of runs; others see them masked
    "payload:read": frozenset({"admin"}),
    # erase a data subject (destroys its data key)
    "privacy:erase": frozenset({"admin"}),
}

T = TypeVar("T")
_USER_ID = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
TOKEN_PREFIX = "fdt_"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

_hasher = argon2.PasswordHasher()
_DUMMY_HASH = _hasher.hash("flowdesk: no such user")
# Hashing has threads of its own: a sign-in never queues behind slow work (OCR, say) that
# others sent to the event loop's default executor.
_hashing = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flowdesk-passwords")


async def _in_hashing_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_hashing, fn, *args)


def allowed(user: UserRecord, permission: str) -> bool:
    return bool(PERMISSIONS[permission] & set(user.roles))


def require(user: UserRecord, permission: str) -> None:
    if user.disabled or not allowed(user, permission):
        raise errors.PermissionDenied(
            f"User {user.id} (roles: {', '.join(user.roles) or 'none'}) may not do this: "
            f"it needs one of the roles {', '.join(sorted(PERMISSIONS[permission]))}."
        )


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _check_roles(roles: Sequence[str]) -> list[str]:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise errors.ConfigurationError(
            f"Unknown role(s) {', '.join(unknown)}: use {', '.join(ROLES)}."
        )
    return sorted(set(roles))


class Identity:
    """Users and tokens of one app's store."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def create_user(
        self,
        user_id: str,
        *,
        name: str | None = None,
        roles: Sequence[str] = ("viewer",),
        groups: Sequence[str] = (),
        manager: str | None = None,
    ) -> UserRecord:
        if not _USER_ID.match(user_id) or user_id.startswith("system"):
            raise errors.ConfigurationError(
                f"User id {user_id!r}: use 1-64 lowercase letters, digits, '.', '_', '@' or "
                "'-', starting with a letter or digit (and not 'system')."
            )
        checked = _check_roles(roles)
        await self.app.submit(
            lambda tx: tx.create_user(user_id, name or user_id, checked, groups, manager)
        )
        return await self.get_user(user_id)

    async def get_user(self, user_id: str) -> UserRecord:
        await self.app.open()
        user = await self.app.store.get_user(user_id)
        if user is None:
            raise errors.NotFound(f"No user {user_id!r}. Create it with `flowdesk users create`.")
        return user

    async def list_users(self) -> list[UserRecord]:
        await self.app.open()
        return await self.app.store.list_users()

    async def update_user(
        self,
        user_id: str,
        *,
        roles: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        manager: str | None = None,
        disabled: bool | None = None,
    ) -> UserRecord:
        checked = None if roles is None else _check_roles(roles)
        await self.app.submit(
            lambda tx: tx.update_user(
                user_id, roles=checked, groups=groups, manager=manager, disabled=disabled
            )
        )
        return await self.get_user(user_id)

    async def create_token(
        self, user_id: str, *, name: str = "api", expires_in: timedelta | None = None
    ) -> tuple[TokenRecord, str]:
        """A new token for ``user_id``: its record and the secret (shown only now)."""
        token_id = "tok_" + secrets.token_hex(8)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = None
        if expires_in is not None:
            if expires_in <= timedelta(0):
                raise errors.ConfigurationError("A token's lifetime must be positive.")
            expires = base.now_ms() + int(expires_in.total_seconds() * 1000)
        await self.app.submit(
            lambda tx: tx.create_token(token_id, user_id, hash_secret(secret), name, expires)
        )
        tokens = await self.app.store.list_tokens(user_id)
        return next(t for t in tokens if t.id == token_id), secret

    async def revoke_token(self, token_id: str) -> None:
        await self.app.submit(lambda tx: tx.revoke_token(token_id))

    async def list_tokens(self, user_id: str | None = None) -> list[TokenRecord]:
        await self.app.open()
        return await self.app.store.list_tokens(user_id)

    async def authenticate(self, secret: str | None) -> UserRecord:
        """The user a bearer token belongs to; `Unauthenticated` when the token is missing,
        unknown (forged), expired or revoked, or its user is disabled."""
        if not secret:
            raise errors.Unauthenticated()
        await self.app.open()
        found = await self.app.store.token_owner(hash_secret(secret))
        if found is None:
            raise errors.Unauthenticated("Unknown token: it was never issued here.")
        token, user = found
        now = datetime.now(UTC)
        if token.revoked_at is not None:
            raise errors.Unauthenticated(f"Token {token.id} was revoked.")
        if token.expires_at is not None and token.expires_at <= now:
            raise errors.Unauthenticated(
                f"Token {token.id} expired at {token.expires_at.isoformat()}: create a new one."
            )
        if user.disabled:
            raise errors.Unauthenticated(f"User {user.id} is disabled.")
        return user

    # -- passwords (web UI sign-in) ------------------------------------------------------
    async def set_password(self, user_id: str, password: str | None) -> None:
        """Set ``user_id``'s password (None removes it: the user can no longer sign in
        with one). Their open web sessions end."""
        hashed = None
        if password is not None:
            check_password_rules(password)
            hashed = await _in_hashing_thread(_hasher.hash, password)
        await self.get_user(user_id)
        await self.app.submit(lambda tx: sql_ui.ui_tx(tx).set_password(user_id, hashed))

    async def check_password(self, user_id: str, password: str) -> UserRecord:
        """The user whose id and password these are; `Unauthenticated` otherwise (the same
        message, and about the same time, for an unknown user, a wrong password, a user
        without a password and a disabled one)."""
        await self.app.open()
        refused = errors.Unauthenticated("Unknown user or wrong password.")
        user = await self.app.store.get_user(user_id) if _USER_ID.match(user_id) else None
        stored = None if user is None else await self.app.store.password_hash(user_id)
        try:
            await _in_hashing_thread(_hasher.verify, stored or _DUMMY_HASH, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            raise refused from None
        if user is None or stored is None or user.disabled:
            raise refused
        if _hasher.check_needs_rehash(stored):  # parameters got stronger since
            await self.set_password(user_id, password)
        return user


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise errors.ConfigurationError(
            f"A password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters "
            f"(this one has {len(password)})."
        )
    if password.strip() != password or "\n" in password:
        raise errors.ConfigurationError(
            "A password may not start or end with spaces, nor hold a line break."
        )
