"""REST over HTTP (httpx): typed operations, auth from secrets, ``Idempotency-Key``.

::

    crm = RestConnector("crm", app, "https://crm.example/api",
                        auth=OAuth2ClientCredentials(token_url, "flowdesk",
                                                     secrets.get("crm.client_secret")))
    create = operation("create_invoice", "POST", "/invoices", Invoice, Created)
    fetch = operation("get_invoice", "GET", "/invoices/{invoice_id}", InvoiceRef, Invoice)

An operation's path is a template: input fields named in it fill it (URL-quoted); the
others go in the JSON body (POST, PUT, PATCH) or the query string (GET, DELETE). Every
request carries ``Idempotency-Key: <run_id:seq>``; a server that keeps the first answer
per key (as Stripe and many payment APIs do) turns a repeated step into one effect.

Answers: 2xx is success (the JSON body is validated against the output model; an empty
body validates as ``{}``). 408, 429 and 5xx are transient, retried by the connector within
its `TransportRetry`, never sooner than ``Retry-After``. 401 with a token-based auth drops
the cached token and tries once more with a new one. Any other 4xx raises
`ConnectorRejected` (a `flowdesk.Permanent` error: the step is not retried).

Auth: `Bearer`, `Basic`, `ApiKeyHeader`, `OAuth2ClientCredentials` (client-credentials
grant, the token cached until ``refresh_before`` seconds before it expires, one token
request at a time).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import re
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from flowdesk import errors
from flowdesk.connectors import base
from flowdesk.connectors.secrets import Secret

if TYPE_CHECKING:
    from flowdesk.engine.app import App

I = TypeVar("I", bound=pydantic.BaseModel)  # noqa: E741
O = TypeVar("O", bound=pydantic.BaseModel)  # noqa: E741

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_ERROR_TEXT = 200  # characters of a refusal's body kept in the error message

__all__ = [
    "REQUEST",
    "ApiKeyHeader",
    "Auth",
    "Basic",
    "Bearer",
    "OAuth2ClientCredentials",
    "RestConnector",
    "RestRequest",
    "RestResponse",
    "RestSpec",
    "operation",
    "retry_after",
]


# -- operations ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RestSpec:
    method: Method
    path: str


def operation(
    name: str,
    method: Method,
    path: str,
    input: type[I],
    output: type[O],
    *,
    allow_fields: Sequence[str] = (),
) -> base.Operation[I, O]:
    """A typed REST operation; ``path`` may name input fields (``/invoices/{invoice_id}``).
    ``allow_fields``: input fields named like credentials that are not (``token_count``)."""
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        raise errors.ConfigurationError(f"operation {name!r}: unknown method {method!r}")
    _check_path(path, f"operation {name!r}")
    names = {f for _, f, _, _ in string.Formatter().parse(path) if f}
    missing = names - set(input.model_fields)
    if missing:
        raise errors.ConfigurationError(
            f"operation {name!r}: the path names {sorted(missing)}, which "
            f"{input.__name__} has no fields for"
        )
    return base.Operation(name, input, output, RestSpec(method, path), frozenset(allow_fields))


def _check_path(path: str, what: str) -> None:
    if not path.startswith("/") or path.startswith("//") or "://" in path:
        raise errors.ConfigurationError(
            f"{what}: the path {path!r} must be relative to the connector's base URL "
            "(start with a single '/')"
        )


class RestRequest(pydantic.BaseModel):
    """The input of the generic `REQUEST` operation."""

    model_config = pydantic.ConfigDict(extra="forbid")

    method: Method
    path: str
    query: dict[str, str | int | float | bool] = {}
    body: Any = None
    headers: dict[str, str] = {}

    @pydantic.field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith("//") or "://" in value:
            raise ValueError("must be a path relative to the connector's base URL")
        return value


class RestResponse(pydantic.BaseModel):
    """The output of the generic `REQUEST` operation."""

    status: int
    body: Any = None


REQUEST: base.Operation[RestRequest, RestResponse] = base.Operation(
    "request", RestRequest, RestResponse, None
)
"""Any method and path under the base URL (the path comes from input: it cannot leave the
base URL's host)."""


# -- answers -------------------------------------------------------------------------------
def retry_after(response: httpx.Response, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the server asks to wait (``Retry-After``: seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def transport_failure(exc: httpx.TransportError) -> base.Transient:
    """A transport error as `base.Transient`; ``maybe_done`` unless the request surely did
    not go out (no connection was made)."""
    sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return base.Transient(f"{type(exc).__name__}", maybe_done=sent)


def check_status(connector: base.Connector, op: str, response: httpx.Response) -> None:
    """Raise for an answer that is not a success: `base.Transient` (408, 429, 5xx) or
    `ConnectorRejected` (other 4xx, 3xx)."""
    code = response.status_code
    if 200 <= code < 300:
        return
    if code in (408, 429) or code >= 500:
        raise base.Transient(
            f"http {code}",
            retry_after=retry_after(response),
            maybe_done=code not in (408, 429, 503),
        )
    text = connector.scrub(response.text[:_ERROR_TEXT]) if response.content else ""
    raise errors.ConnectorRejected(
        f"connector {connector.name!r}, operation {op!r}: {response.request.method} "
        f"{base.redact_url(str(response.request.url))} answered {code}"
        + (f": {text}" if text else "")
        + ". Fix the input or the target, then retry the run.",
        connector=connector.name,
        operation=op,
        status=code,
    )


def json_body(connector: base.Connector, op: str, response: httpx.Response) -> Any:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:
        raise errors.BadTargetResponse(
            f"connector {connector.name!r}, operation {op!r}: the answer "
            f"(http {response.status_code}) is not JSON. The call itself went through.",
            connector=connector.name,
            operation=op,
        ) from None


# -- auth --------------------------------------------------------------------------------------
class Auth(ABC):
    """How requests authenticate. Credentials are `Secret` objects from `secrets.Secrets`."""

    @abstractmethod
    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        """Headers to add to a request (may fetch a token)."""

    @abstractmethod
    def secrets(self) -> Sequence[Secret]: ...

    def invalidate(self) -> bool:
        """Forget a cached credential after a 401; True when a new one may help."""
        return False


class Bearer(Auth):
    """``Authorization: Bearer <token>``."""

    def __init__(self, token: Secret) -> None:
        self.token = token

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.reveal()}"}

    def secrets(self) -> Sequence[Secret]:
        return (self.token,)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class Basic(Auth):
    """``Authorization: Basic base64(user:password)``."""

    def __init__(self, username: str, password: Secret) -> None:
        self.username = username
        self.password = password
        self._header = Secret(_basic(username, password.reveal()), f"{password.name}#basic")

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {"Authorization": self._header.reveal()}

    def secrets(self) -> Sequence[Secret]:
        return (self.password, self._header)


class ApiKeyHeader(Auth):
    """An API key in a header of the target's choosing (``X-Api-Key: <key>``)."""

    def __init__(self, header: str, key: Secret) -> None:
        self.header = header
        self.key = key

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {self.header: self.key.reveal()}

    def secrets(self) -> Sequence[Secret]:
        return (self.key,)


class OAuth2ClientCredentials(Auth):
    """OAuth 2.0 client-credentials grant (RFC 6749 §4.4).

    The access token is cached and reused until ``refresh_before`` seconds before it
    expires (half its lifetime, for tokens shorter than twice that); then the next request
    fetches a new one first. Concurrent requests share one token request. The client
    authenticates with HTTP Basic (``client_auth="basic"``, the RFC's default) or with
    ``client_id``/``client_secret`` form fields (``"body"``). A token endpoint that
    refuses (4xx) raises `ConnectorRejected`; 429/5xx and transport errors are transient.
    ``token_requests`` counts the tokens fetched."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: Secret,
        *,
        scope: str | None = None,
        refresh_before: float = 60.0,
        client_auth: Literal["basic", "body"] = "basic",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_before < 0:
            raise errors.ConfigurationError("refresh_before must be >= 0")
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope
        self.refresh_before = refresh_before
        self.client_auth = client_auth
        self._clock = clock
        self._token: Secret | None = None
        self._refresh_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._basic = Secret(_basic(client_id, client_secret.reveal()), "oauth2#basic")
        self.token_requests = 0

    def secrets(self) -> Sequence[Secret]:
        found = [self.client_secret, self._basic]
        if self._token is not None:
            found.append(self._token)
        return found

    def invalidate(self) -> bool:
        self._token = None
        return True

    def _fresh(self) -> Secret | None:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return None

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        token = self._fresh()
        if token is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                token = self._fresh() or await self._fetch(client)
        return {"Authorization": f"Bearer {token.reveal()}"}

    async def _fetch(self, client: httpx.AsyncClient) -> Secret:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.client_auth == "basic":
            headers["Authorization"] = self._basic.reveal()
        else:
            form.update(client_id=self.client_id, client_secret=self.client_secret.reveal())
        asked = self._clock()
        try:
            response = await client.post(self.token_url, data=form, headers=headers)
        except httpx.TransportError as exc:
            raise base.Transient(f"token endpoint: {type(exc).__name__}") from None
        self.token_requests += 1
        where = base.redact_url(self.token_url)
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise base.Transient(
                f"token endpoint {where}: http {response.status_code}",
                retry_after=retry_after(response),
            )
        if response.status_code != 200:
            raise errors.ConnectorRejected(
                f"the token endpoint {where} refused the client credentials of "
                f"{self.client_id!r} (http {response.status_code}): check the client id and "
                "secret",
                status=response.status_code,
            )
        try:
            answer = response.json()
            token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in") or 3600)
        except (ValueError, KeyError, TypeError):
            raise errors.BadTargetResponse(
                f"the token endpoint {where} answered without a usable access_token"
            ) from None
        margin = min(self.refresh_before, lifetime / 2)
        self._token = Secret(token, "oauth2#access_token")
        self._refresh_at = asked + lifetime - margin
        return self._token


# -- the connector -----------------------------------------------------------------------------
class RestConnector(base.Connector):
    """A REST API under ``base_url`` (see the module docstring)."""

    kind = "rest"

    def __init__(
        self,
        name: str,
        app: App,
        base_url: str,
        *,
        auth: Auth | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        retry: base.TransportRetry | None = None,
        rate: base.TokenBucket | None = None,
        verify: bool | str = True,
    ) -> None:
        super().__init__(name, app, timeout=timeout, retry=retry, rate=rate)
        if httpx.URL(base_url).userinfo:
            raise errors.ConfigurationError(
                f"connector {name!r}: put credentials in auth=, not in the base URL"
            )
        for header in headers or {}:
            if base.credential_key(header):
                raise errors.ConfigurationError(
                    f"connector {name!r}: header {header!r} looks like a credential; pass it "
                    "as auth=ApiKeyHeader(...) with a secret"
                )
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self._headers = dict(headers or {})
        self._verify = verify
        self._client: httpx.AsyncClient | None = None

    def secrets(self) -> Sequence[Secret]:
        return () if self.auth is None else self.auth.secrets()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, headers=self._headers, verify=self._verify
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _request_parts(
        self, op: base.Operation[Any, Any], data: pydantic.BaseModel
    ) -> tuple[str, str, dict[str, Any], Any, dict[str, str]]:
        """method, path, query, JSON body, extra headers."""
        if isinstance(data, RestRequest):
            return data.method, data.path, dict(data.query), data.body, dict(data.headers)
        spec: RestSpec = op.spec
        fields = data.model_dump(mode="json")
        names = {f for _, f, _, _ in string.Formatter().parse(spec.path) if f}
        path = spec.path.format(**{n: quote(str(fields.pop(n)), safe="") for n in names})
        if spec.method in _BODY_METHODS:
            return spec.method, path, {}, fields, {}
        query = {k: v for k, v in fields.items() if v is not None}
        return spec.method, path, query, None, {}

    def target(self, op: base.Operation[Any, Any], data: pydantic.BaseModel) -> str:
        """``METHOD url``: for a typed operation with its path template unfilled, and never
        with a query string, so that input values stay out of audit records and logs."""
        if isinstance(data, RestRequest):
            method, path = data.method, data.path
        else:
            spec: RestSpec = op.spec
            method, path = spec.method, spec.path
        return f"{method} {base.redact_url(self.base_url + path.split('?', 1)[0])}"

    async def _perform(
        self, op: base.Operation[Any, Any], data: Any, call: base.Call
    ) -> base.Outcome:
        method, path, query, body, extra = self._request_parts(op, data)
        url = self.base_url + path
        headers = {**extra, "Idempotency-Key": call.idempotency_key}
        response = await self._send(method, url, query, body, headers)
        if response.status_code == 401 and self.auth is not None and self.auth.invalidate():
            response = await self._send(method, url, query, body, headers)
        check_status(self, op.name, response)
        value = json_body(self, op.name, response)
        if op.output is RestResponse:
            value = RestResponse(status=response.status_code, body=value or None)
        return base.Outcome(value, f"http {response.status_code}")

    async def _send(
        self,
        method: str,
        url: str,
        query: dict[str, Any],
        body: Any,
        headers: dict[str, str],
    ) -> httpx.Response:
        client = self.client
        if self.auth is not None:
            headers = {**headers, **await self.auth.headers(client)}
        try:
            return await client.request(
                method, url, params=query or None, json=body, headers=headers
            )
        except httpx.TransportError as exc:
            raise transport_failure(exc) from None
