"""Outgoing webhooks: signed JSON POSTs (httpx), one delivery id per step call.

::

    partner = WebhookConnector("partner", app, "https://partner.example/hooks/flowdesk",
                               secret=secrets.get("partner.webhook_secret"))
    paid = event("invoice.paid", InvoicePaid)

    @app.step
    async def tell_partner(e: InvoicePaid) -> Delivered:
        return await partner.call(paid, e)

Every request carries::

    Content-Type: application/json
    X-Flowdesk-Event: invoice.paid
    X-Flowdesk-Delivery: <run_id:seq>              the same on every retry and replay
    X-Flowdesk-Timestamp: <Unix seconds>           when this attempt was signed
    X-Flowdesk-Signature: v1=<hex>                 HMAC-SHA256(secret, timestamp + "." + body)

the format flowdesk's own incoming webhooks (`flowdesk.triggers.webhooks`) verify. The body
is ``{"id": <delivery id>, "event": <name>, "data": <input>}`` as canonical JSON (sorted
keys, no spaces), byte for byte the same on every attempt, so a receiver that remembers
delivery ids can drop a repeat and refuse a different body under a known id. Each attempt
is signed again with a fresh timestamp, so a retry is never refused as stale. During a
secret rotation pass ``secret=[new, old]``: the signature header then carries one ``v1=``
per secret (``v1=<new>,v1=<old>``) and a receiver that knows either accepts it.

2xx is delivered. 408, 429 and 5xx are transient (retried within the connector's
`TransportRetry`, never sooner than ``Retry-After``); any other answer (410 Gone, 4xx)
raises `ConnectorRejected`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pydantic

from flowdesk import errors
from flowdesk.connectors import base, rest
from flowdesk.connectors.secrets import Secret
from flowdesk.store import audit

if TYPE_CHECKING:
    from flowdesk.engine.app import App

I = TypeVar("I", bound=pydantic.BaseModel)  # noqa: E741

EVENT_HEADER = "X-Flowdesk-Event"
DELIVERY_HEADER = "X-Flowdesk-Delivery"
TIMESTAMP_HEADER = "X-Flowdesk-Timestamp"
SIGNATURE_HEADER = "X-Flowdesk-Signature"

__all__ = [
    "DELIVER",
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Delivered",
    "WebhookConnector",
    "WebhookEvent",
    "body",
    "event",
    "sign",
    "verify",
]


class WebhookEvent(pydantic.BaseModel):
    """The input of the generic `DELIVER` operation."""

    model_config = pydantic.ConfigDict(extra="forbid")

    event: str = pydantic.Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    data: dict[str, Any] = {}


class Delivered(pydantic.BaseModel):
    delivery_id: str
    status: int


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str


DELIVER: base.Operation[WebhookEvent, Delivered] = base.Operation(
    "deliver", WebhookEvent, Delivered, None
)


def event(
    name: str, data: type[I], *, allow_fields: Sequence[str] = ()
) -> base.Operation[I, Delivered]:
    """A typed event: the input model is the body's ``data``."""
    WebhookEvent(event=name)  # the same rules for the name
    return base.Operation(name, data, Delivered, EventSpec(name), frozenset(allow_fields))


def body(delivery_id: str, event_name: str, data: Any) -> bytes:
    """The exact bytes delivered (canonical JSON)."""
    return audit.canonical({"id": delivery_id, "event": event_name, "data": data})


def sign(secret: str | bytes, timestamp: int | str, payload: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 of ``timestamp + "." + payload``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + payload, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    payload: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Does a delivery verify: a ``v1=`` signature matching ``secret`` (in constant time)
    and a timestamp within ``tolerance`` seconds of ``now``? For receivers written in
    Python; flowdesk's own incoming webhooks use `flowdesk.triggers.webhooks`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    if not stamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance:
        return False
    expected = sign(secret, stamp, payload)
    offered = [p.strip() for p in lowered.get(SIGNATURE_HEADER.lower(), "").split(",")]
    return any(hmac.compare_digest(expected.encode(), p.encode()) for p in offered)


class WebhookConnector(base.Connector):
    """Signed deliveries to one URL (see the module docstring)."""

    kind = "webhook"

    def __init__(
        self,
        name: str,
        app: App,
        url: str,
        *,
        secret: Secret | Sequence[Secret],
        timeout: float = 10.0,
        retry: base.TransportRetry | None = None,
        rate: base.TokenBucket | None = None,
        verify_tls: bool | str = True,
    ) -> None:
        super().__init__(name, app, timeout=timeout, retry=retry, rate=rate)
        keys = [secret] if isinstance(secret, Secret) else list(secret)
        if not keys or not all(isinstance(k, Secret) for k in keys):
            raise errors.ConfigurationError(
                f"connector {name!r}: secret= takes one Secret or a list of them (new first)"
            )
        if httpx.URL(url).userinfo:
            raise errors.ConfigurationError(
                f"connector {name!r}: the webhook URL must not hold credentials"
            )
        self.url = url
        self._keys = keys
        self._verify = verify_tls
        self._client: httpx.AsyncClient | None = None

    def secrets(self) -> Sequence[Secret]:
        return self._keys

    def target(self, op: base.Operation[Any, Any], data: pydantic.BaseModel) -> str:
        return f"POST {base.redact_url(self.url)}"

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self._verify)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _perform(
        self, op: base.Operation[Any, Any], data: Any, call: base.Call
    ) -> base.Outcome:
        if isinstance(data, WebhookEvent):
            name, content = data.event, data.data
        else:
            name, content = op.spec.name, data.model_dump(mode="json")
        payload = body(call.idempotency_key, name, content)
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: name,
            DELIVERY_HEADER: call.idempotency_key,
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: ",".join(sign(k.reveal(), stamp, payload) for k in self._keys),
        }
        try:
            response = await self.client.post(self.url, content=payload, headers=headers)
        except httpx.TransportError as exc:
            raise rest.transport_failure(exc) from None
        rest.check_status(self, op.name, response)
        return base.Outcome(
            Delivered(delivery_id=call.idempotency_key, status=response.status_code),
            f"http {response.status_code}",
        )
