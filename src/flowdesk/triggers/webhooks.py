"""Signed webhooks: ``POST /hooks/{name}`` starts a run, or signals one.

Register a hook in Python, next to the workflow it feeds::

    from flowdesk import triggers

    triggers.webhook(app, "orders", workflow=process_order, secret_env="ORDERS_HOOK_SECRET")
    triggers.webhook(
        app, "approved", mode="signal", signal="approved", secret_file="/run/secrets/approved"
    )

The secret comes from an environment variable or a secrets file of the server, read on every
delivery (so it can be rotated without a restart), never from the request. Several secrets
(separated by commas in the variable, one per line in the file) are all accepted while a
rotation is under way.

How a sender signs a delivery::

    timestamp = str(int(time.time()))                       # Unix seconds, now
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    POST /hooks/orders
    Content-Type: application/json
    X-Flowdesk-Timestamp: <timestamp>
    X-Flowdesk-Signature: v1=<mac>                          # "v1=a,v1=b": any one may match
    X-Flowdesk-Delivery: <a unique id, the same on every retry of this delivery>

What the server answers:

* ``201`` (start mode) the run was started; ``202`` (signal mode) the signal was stored.
  The body names the run.
* ``200`` with ``X-Flowdesk-Replay: true``: this delivery id came before with the same body;
  the body names the run it started (or signalled) then, and nothing new happens. A sender
  that did not see the first answer can retry safely.
* ``401`` `BadSignature`: no signature, or none that verifies with the hook's secret (the
  comparison takes constant time). ``401`` `StaleDelivery`: the timestamp is more than
  ``tolerance`` seconds (default 300) before or after the server's clock.
* ``404`` `UnknownHook`; in signal mode also `RunNotFound`.
* ``409`` `DeliveryConflict`: the delivery id came before with another body, or this very
  signed request (timestamp and body) came before under another delivery id (someone
  replays a captured request). In signal mode also `InvalidState` (the run finished).
* ``413``: the body is larger than ``max_body``. ``422``: the body is not JSON, or not the
  workflow's input; or the delivery id is missing.
* ``503`` `SecretUnavailable`: the hook's secret is not configured on the server.

API tokens play no part: the signature is the credential.

Durability. The delivery (hook, delivery id, SHA-256 of the body and of the signed text, the
run) is stored in ``webhook_deliveries`` in the same transaction as the run it starts (with
idempotency key ``webhook:<hook>:<delivery id>``) or the signal it stores, with an audit
record ``webhook.received``: either all of it happened or none of it did.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowdesk import codec, errors
from flowdesk.engine.app import App
from flowdesk.store import base, sql

Mode = Literal["start", "signal"]

TIMESTAMP_HEADER = "X-Flowdesk-Timestamp"
SIGNATURE_HEADER = "X-Flowdesk-Signature"
DELIVERY_HEADER = "X-Flowdesk-Delivery"
REPLAY_HEADER = "X-Flowdesk-Replay"

DEFAULT_TOLERANCE = 300.0
DEFAULT_MAX_BODY = 1024 * 1024

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DELIVERY_PATTERN = r"^[!-~]{1,200}$"  # printable ASCII, no spaces
_NAME = re.compile(NAME_PATTERN)
_DELIVERY = re.compile(DELIVERY_PATTERN)
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")


def sign(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The ``X-Flowdesk-Signature`` value of ``body`` sent at ``timestamp``: ``v1=<hex>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(
    secret: str | bytes, body: bytes, delivery_id: str, timestamp: int | None = None
) -> dict[str, str]:
    """Every header a sender needs (a helper for senders written in Python, and tests)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
        DELIVERY_HEADER: delivery_id,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    """One registered hook (see `webhook`)."""

    name: str
    mode: Mode
    workflow: str | None
    secret_env: str | None
    secret_file: Path | None
    tolerance: float
    signal: str
    run_field: str
    max_body: int
    to_input: Callable[[Any], Any] | None = field(default=None, compare=False)

    def secrets(self) -> list[bytes]:
        """The hook's current secrets (raises `SecretUnavailable`)."""
        if self.secret_env is not None:
            raw = os.environ.get(self.secret_env, "")
            where = f"environment variable {self.secret_env}"
            parts = raw.split(",")
        else:
            assert self.secret_file is not None
            where = f"secrets file {self.secret_file}"
            try:
                parts = self.secret_file.read_text("utf-8").splitlines()
            except OSError as exc:
                raise errors.SecretUnavailable(
                    f"Webhook {self.name!r}: cannot read its {where}: {exc.strerror}."
                ) from None
        found = [p.strip().encode() for p in parts if p.strip()]
        if not found:
            raise errors.SecretUnavailable(
                f"Webhook {self.name!r}: its {where} is empty or not set. Set it on the "
                "server (the secret never travels with a request)."
            )
        return found

    def verify(
        self, body: bytes, timestamp: str | None, signature: str | None, now: float | None = None
    ) -> None:
        """Check the signature (constant-time comparison), then the timestamp's age."""
        if not timestamp or not signature:
            missing = TIMESTAMP_HEADER if not timestamp else SIGNATURE_HEADER
            raise errors.BadSignature(
                f"Webhook {self.name!r}: the {missing} header is missing. Sign "
                f'timestamp + "." + body with HMAC-SHA256 and send {SIGNATURE_HEADER}: '
                f"v1=<hex> and {TIMESTAMP_HEADER}: <Unix seconds>."
            )
        if not _TIMESTAMP.match(timestamp):
            raise errors.BadSignature(
                f"Webhook {self.name!r}: {TIMESTAMP_HEADER} must be Unix seconds (digits only)."
            )
        offered = [
            part.strip()[3:].lower()
            for part in signature.split(",")
            if part.strip().lower().startswith("v1=")
        ]
        ok = False
        for secret in self.secrets():
            expected = sign(secret, timestamp, body)[3:]
            for candidate in offered:
                # Constant time: how long it takes does not tell where they differ.
                if hmac.compare_digest(expected.encode(), candidate.encode("utf-8", "replace")):
                    ok = True
        if not ok:
            raise errors.BadSignature(
                f"Webhook {self.name!r}: the signature does not verify. Sign "
                f'timestamp + "." + raw body with HMAC-SHA256 and the hook\'s secret, and send '
                f"{SIGNATURE_HEADER}: v1=<hex>."
            )
        skew = (time.time() if now is None else now) - int(timestamp)
        if abs(skew) > self.tolerance:
            direction = "old" if skew > 0 else "in the future"
            raise errors.StaleDelivery(
                f"Webhook {self.name!r}: {TIMESTAMP_HEADER} {timestamp} is {abs(skew):.0f} s "
                f"{direction}; deliveries must be signed within {self.tolerance:.0f} s of the "
                "server's clock. Sign each delivery (and each retry) with the current time, "
                "and check the sender's clock."
            )


class Webhooks:
    """The hooks of one app (`hooks_of`)."""

    def __init__(self) -> None:
        self._hooks: dict[str, Webhook] = {}

    def add(self, hook: Webhook) -> Webhook:
        existing = self._hooks.get(hook.name)
        if existing is not None and existing != hook:
            raise errors.ConfigurationError(f"Webhook {hook.name!r} is registered twice.")
        self._hooks[hook.name] = hook
        return hook

    def get(self, name: str) -> Webhook:
        try:
            return self._hooks[name]
        except KeyError:
            raise errors.UnknownHook(name, list(self._hooks)) from None

    def __iter__(self) -> Iterator[Webhook]:
        return iter(list(self._hooks.values()))

    def __len__(self) -> int:
        return len(self._hooks)


_REGISTRIES: weakref.WeakKeyDictionary[App, Webhooks] = weakref.WeakKeyDictionary()


def hooks_of(app: App) -> Webhooks:
    """The webhooks registered for ``app`` (an empty registry at first)."""
    found = _REGISTRIES.get(app)
    if found is None:
        found = _REGISTRIES[app] = Webhooks()
    return found


def webhook(
    app: App,
    name: str,
    *,
    workflow: str | Callable[..., Any] | None = None,
    mode: Mode = "start",
    secret_env: str | None = None,
    secret_file: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    signal: str | None = None,
    run_field: str = "run_id",
    max_body: int = DEFAULT_MAX_BODY,
    to_input: Callable[[Any], Any] | None = None,
) -> Webhook:
    """Register ``POST /hooks/<name>`` for ``app``.

    ``mode="start"``: each delivery starts a run of ``workflow`` (registered already) whose
    input is the JSON body (or ``to_input(body)``), validated by the workflow's input model.
    ``mode="signal"``: each delivery sends signal ``signal`` (default: the hook's name) to the
    run named by the body's ``run_field`` field, with the body (or ``to_input(body)``) as
    payload. Exactly one of ``secret_env`` and ``secret_file`` names the secret.
    ``tolerance``: how many seconds the signed timestamp may be off the server's clock,
    either way. ``max_body``: the largest body accepted, in bytes."""
    if not _NAME.match(name):
        raise errors.ConfigurationError(
            f"Webhook name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)."
        )
    if mode not in ("start", "signal"):
        raise errors.ConfigurationError(f"Webhook {name!r}: mode must be 'start' or 'signal'.")
    if (secret_env is None) == (secret_file is None):
        raise errors.ConfigurationError(
            f"Webhook {name!r}: name its secret with exactly one of secret_env= and secret_file=."
        )
    if not tolerance > 0:
        raise errors.ConfigurationError(f"Webhook {name!r}: tolerance must be > 0 seconds.")
    if max_body < 1:
        raise errors.ConfigurationError(f"Webhook {name!r}: max_body must be >= 1 byte.")
    workflow_name: str | None = None
    if mode == "start":
        if workflow is None:
            raise errors.ConfigurationError(f"Webhook {name!r}: mode 'start' needs workflow=.")
        workflow_name = app.registry.workflow(app.workflow_name(workflow)).name
    signal_name = signal or name
    if signal_name.startswith("flowdesk."):
        raise errors.ConfigurationError(
            f"Webhook {name!r}: signal names starting with 'flowdesk.' are the engine's own."
        )
    hook = Webhook(
        name=name,
        mode=mode,
        workflow=workflow_name,
        secret_env=secret_env,
        secret_file=None if secret_file is None else Path(secret_file),
        tolerance=float(tolerance),
        signal=signal_name,
        run_field=run_field,
        max_body=max_body,
        to_input=to_input,
    )
    return hooks_of(app).add(hook)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What a delivery did: the run it started or signalled, and whether it was a replay."""

    hook: str
    delivery_id: str
    mode: Mode
    run_id: str
    replay: bool


def _sql_tx(tx: base.Tx) -> sql.SqlTx:
    # The store has no webhook-specific operation: these statements are portable SQL run
    # through the SQL transaction's statement runners, in the caller's transaction.
    if not isinstance(tx, sql.SqlTx):
        raise errors.ConfigurationError("Webhook deliveries need a SQL store.")
    return tx


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_body(hook: Webhook, body: bytes) -> Any:
    """The body as JSON, without what a store cannot keep as text: NaN or Infinity, lone
    surrogates."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
        codec.encode(value, "the body").encode("utf-8")
    except (UnicodeError, ValueError, errors.SerializationError) as exc:
        raise errors.InvalidInput(
            hook.workflow or hook.name, [{"loc": ("body",), "msg": f"not usable JSON: {exc}"}]
        ) from None
    return value


async def receive(
    app: App,
    name: str,
    body: bytes,
    *,
    timestamp: str | None,
    signature: str | None,
    delivery_id: str | None,
    now: float | None = None,
) -> Accepted:
    """Verify one delivery of hook ``name`` and act on it (see the module docstring)."""
    hook = hooks_of(app).get(name)
    if len(body) > hook.max_body:
        raise errors.InvalidInput(
            hook.workflow or hook.name,
            [{"loc": ("body",), "msg": f"the body is larger than {hook.max_body} bytes"}],
        )
    hook.verify(body, timestamp, signature, now)
    if not delivery_id or not _DELIVERY.match(delivery_id):
        raise errors.InvalidInput(
            hook.workflow or hook.name,
            [
                {
                    "loc": ("header", DELIVERY_HEADER),
                    "msg": "a delivery id is required: 1 to 200 printable ASCII characters, "
                    "unique per delivery and the same on every retry",
                }
            ],
        )
    value = _json_body(hook, body)
    payload = hook.to_input(value) if hook.to_input is not None else value
    body_sha = hashlib.sha256(body).hexdigest()
    signed_sha = hashlib.sha256(str(timestamp).encode() + b"." + body).hexdigest()
    await app.open()
    new: base.NewRun | None = None
    target = ""
    encoded: str | None = None
    if hook.mode == "start":
        assert hook.workflow is not None
        new = app.new_run(hook.workflow, payload, idempotency_key=f"webhook:{name}:{delivery_id}")
        target = new.id
    else:
        run_id = value.get(hook.run_field) if isinstance(value, dict) else None
        if not isinstance(run_id, str) or not run_id:
            raise errors.InvalidInput(
                hook.name,
                [{"loc": ("body", hook.run_field), "msg": "the run's id (a string) is required"}],
            )
        target = run_id
        encoded = codec.encode(payload, f"payload of webhook {name!r}")

    async def op(tx: base.Tx) -> Accepted:
        s = _sql_tx(tx)
        inserted = await s._one(
            "INSERT INTO webhook_deliveries (hook, delivery_id, body_sha256, signed_sha256,"
            " mode, run_id, received_at) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING RETURNING run_id",
            (name, delivery_id, body_sha, signed_sha, hook.mode, target, tx.now),
        )
        if inserted is None:
            row = await s._one(
                "SELECT body_sha256, run_id, mode FROM webhook_deliveries"
                " WHERE hook = ? AND delivery_id = ?",
                (name, delivery_id),
            )
            if row is None:  # the signed text is what collided
                other = await s._one(
                    "SELECT delivery_id FROM webhook_deliveries WHERE hook = ?"
                    " AND signed_sha256 = ?",
                    (name, signed_sha),
                )
                raise errors.DeliveryConflict(
                    f"Webhook {name!r}: this signed request (same timestamp and body) was "
                    f"already delivered as {other[0] if other else 'another delivery'!r}; "
                    f"delivery {delivery_id!r} was refused. Sign new deliveries afresh."
                )
            if row[0] != body_sha:
                raise errors.DeliveryConflict(
                    f"Webhook {name!r}: delivery {delivery_id!r} was received before with "
                    "another body; nothing was started. Send new work under a new delivery id."
                )
            return Accepted(name, delivery_id, row[2], row[1], True)
        run_id = target
        if new is not None:
            run_id, _ = await tx.create_run(new)
            if run_id != target:  # the key named a run that already existed
                await s._run(
                    "UPDATE webhook_deliveries SET run_id = ? WHERE hook = ? AND delivery_id = ?",
                    (run_id, name, delivery_id),
                )
        else:
            await tx.signal(run_id, hook.signal, encoded)
        tx.audit(
            "webhook.received",
            "hook:" + name,
            {
                "delivery_id": delivery_id,
                "body_sha256": body_sha,
                "mode": hook.mode,
                "run_id": run_id,
            },
        )
        return Accepted(name, delivery_id, hook.mode, run_id, False)

    accepted: Accepted = await app.submit(op, actor=f"system:webhook:{name}")
    if not accepted.replay:
        app.wake()
    return accepted
