"""The connector seam: typed, idempotent, audited calls to other systems.

A connector is called from inside an ``@app.step`` function::

    crm = rest.RestConnector("crm", app, base_url=..., auth=rest.Bearer(secrets.get("crm.token")))
    create_invoice = rest.operation("create_invoice", "POST", "/invoices", Invoice, Created)

    @app.step(retries=3)
    async def post_invoice(invoice: Invoice) -> Created:
        return await crm.call(create_invoice, invoice)

What every call gets from `Connector.call`:

* **Typed input and output.** An `Operation` names a Pydantic model for each. The input is
  validated before anything goes out; the target's answer is validated against the output
  model (`BadTargetResponse` when it does not fit).
* **The run's idempotency key**, handed to the target (an ``Idempotency-Key`` header, the
  key column of an upsert, a Message-ID, a delivery id). Inside a step it is
  ``current_step().idempotency_key`` (``run_id:seq``): a step run again after a crash or a
  failed attempt sends the same key, so the target can recognise the repeat. The n-th call
  of the same connector within one step attempt gets ``run_id:seq/n`` (n >= 2), so calls
  must come in a deterministic order (concurrent calls inside one step should pass
  ``idempotency_key=`` themselves).
* **Retries of two kinds.** The step's retry policy (``@app.step(retries=...)``) retries
  whatever fails; the connector adds only a short, bounded retry of *transient transport*
  failures (`Transient`: connection errors, timeouts, 429 and 5xx answers), with
  exponential backoff and jitter (`TransportRetry`, the engine's `RetryPolicy` semantics),
  never sooner than a ``Retry-After`` asks. A ``Retry-After`` longer than
  ``max_retry_after`` ends the call at once with `ConnectorUnavailable` (``retry_after``
  set) and leaves the waiting to the step. Failures that no retry can fix raise a
  `flowdesk.Permanent` error (`ConnectorRejected`, `ConnectorInputRefused`,
  `BadTargetResponse`), so the step is not retried either.
* **A rate limit**: a token bucket per connector object (`TokenBucket`), in this process.
* **A timeout** on every attempt.
* **One audit record per call** (``connector.called``, subject ``connector:<name>``),
  appended through the store in its own transaction. It holds the operation, the target
  (no credentials, no secret query values), the status, the duration, the attempts, the
  idempotency key and SHA-256 digests of the input and output, never the payloads; every
  known secret value is scrubbed from it, as from log lines and error messages.
* **No credentials from workflow input.** Credentials come from `secrets.Secrets`
  (environment or a 0600 secrets file) when the connector is built; an input with a field
  named like a credential (``password``, ``api_key``, ``authorization`` ...), a value like
  ``Bearer ...``, or one of the connector's secret values is refused
  (`ConnectorInputRefused`) before anything goes out.

Targets that cannot recognise a repeat (SMTP) set ``records_effects``: each call is first
claimed in the store's ``connector_effects`` table under ``(connector, idempotency_key)``.
A key already ``done`` returns the recorded output without calling the target again; a
key whose earlier attempt never reported back (``started``) is the uncertain case: the
connector sends again (``on_uncertain="resend"``, the target sees the same key, e.g. the
same Message-ID) or refuses (``"refuse"``: `EffectUncertain`, for an operator).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import pydantic

from flowdesk import errors
from flowdesk.connectors import secrets as secrets_
from flowdesk.engine import context, registry
from flowdesk.store import audit
from flowdesk.store import base as store_base
from flowdesk.store import sql as store_sql

if TYPE_CHECKING:
    from flowdesk.engine.app import App

I = TypeVar("I", bound=pydantic.BaseModel)  # noqa: E741
O = TypeVar("O", bound=pydantic.BaseModel)  # noqa: E741

log = logging.getLogger("flowdesk.connectors")

AUDIT_ACTION = "connector.called"
CLAIM_ACTION = "connector.effect_started"
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_KEYS_REMEMBERED = 4096

__all__ = [
    "AUDIT_ACTION",
    "Call",
    "Connector",
    "Operation",
    "Outcome",
    "TokenBucket",
    "Transient",
    "TransportRetry",
    "credential_key",
    "digest",
    "redact_url",
]


# -- operations ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Operation(Generic[I, O]):
    """One typed operation of a connector: its name, its input and output models, and what
    the connector needs to carry it out (``spec``: a method and path, a table ...)."""

    name: str
    input: type[I]
    output: type[O]
    spec: Any = None
    allow_fields: frozenset[str] = frozenset()
    """Input field names that look like credentials but are not (``token_count``)."""


@dataclass(frozen=True, slots=True)
class Call:
    """What a connector's `Connector._perform` knows about the call it carries out."""

    connector: str
    operation: str
    idempotency_key: str
    attempt: int
    step: context.StepInfo | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `Connector._perform` returns: the answer (validated against the operation's
    output model by the base) and a short detail for the audit record (``http 201``), which
    must not hold payload data."""

    value: Any
    detail: str = "ok"


class Transient(Exception):
    """Raised by `Connector._perform` for a failure worth retrying soon: a connection error,
    a 429 or 5xx answer. ``retry_after``: what the target asked for (seconds).
    ``maybe_done``: the request may have reached the target and had its effect (a timeout
    waiting for the answer)."""

    def __init__(
        self, reason: str, *, retry_after: float | None = None, maybe_done: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.maybe_done = maybe_done


# -- retries and rate limits -------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TransportRetry(registry.RetryPolicy):
    """The connector's own retry of `Transient` failures: the engine's `RetryPolicy`
    (``retries`` after the first try, exponential backoff, jitter in [0.5, 1.0]) with short
    defaults, plus ``max_retry_after``: the longest ``Retry-After`` the connector waits
    out itself. A longer one ends the call with `ConnectorUnavailable` (``retry_after``
    set), and the step's own retry policy decides what comes next."""

    retries: int = 2
    delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 30.0

    def wait(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``retry`` (1-based); None: do not retry."""
        if retry > self.retries:
            return None
        backoff = self.wait_before(retry)
        if retry_after is None:
            return backoff
        if retry_after > self.max_retry_after:
            return None
        return max(retry_after, backoff)


class TokenBucket:
    """A token bucket: ``rate`` calls per second on average, bursts of up to ``burst``.

    One bucket limits one connector object in one process (the engine's queue limits are
    the ones that hold across workers). ``clock`` and ``sleep`` can be replaced, e.g. by a
    virtual clock in tests."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise errors.ConfigurationError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a token if one is there now."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> float:
        """Wait for a token (first come, first served); returns the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        waited = 0.0
        async with self._lock:
            while not self.try_acquire():
                pause = (1 - self._tokens) / self.rate
                await self._sleep(pause)
                waited += pause
        return waited


# -- what may not travel in input, audit data or logs ----------------------------------------
_CREDENTIAL_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "apikey",
        "authorization",
        "credential",
        "credentials",
        "bearer",
        "cookie",
    }
)
_CREDENTIAL_PAIRS = frozenset(
    {
        "apikey",
        "accesskey",
        "privatekey",
        "secretkey",
        "clientsecret",
        "accesstoken",
        "refreshtoken",
        "authtoken",
        "sessionid",
    }
)
_SECRET_QUERY_WORDS = frozenset({"key", "sig", "signature", "code", "auth", "pass", "jwt"})
_CREDENTIAL_VALUE = re.compile(r"^\s*(bearer|basic|token)\s+\S{8,}\s*$", re.IGNORECASE)


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def credential_key(name: str) -> bool:
    """Does a field or header name look like it holds a credential?"""
    words = _words(name)
    if any(w in _CREDENTIAL_WORDS for w in words):
        return True
    return any(a + b in _CREDENTIAL_PAIRS for a, b in zip(words, words[1:], strict=False))


def redact_url(url: str) -> str:
    """``url`` without user name, password and fragment, and with the value of every query
    parameter named like a credential replaced by ``***``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        hidden = credential_key(name) or any(w in _SECRET_QUERY_WORDS for w in _words(name))
        query.append(f"{quote(name)}={secrets_.MASK if hidden else quote(value)}")
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(query), ""))


def digest(value: Any) -> str | None:
    """SHA-256 of a value's canonical JSON (audit records hold digests, not payloads)."""
    if value is None:
        return None
    return hashlib.sha256(audit.canonical(value)).hexdigest()


def _where(record: dict[str, Any]) -> Where:
    run_id, seq = record.get("run_id"), record.get("seq")
    return None if run_id is None or seq is None else (str(run_id), int(seq))


def _scrub_value(value: Any, hidden: Sequence[secrets_.Secret]) -> Any:
    if isinstance(value, str):
        return secrets_.scrub(value, hidden)
    if isinstance(value, dict):
        return {k: _scrub_value(v, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, hidden) for v in value]
    return value


# -- the connector_effects table (in the flowdesk store) -------------------------------------
Prior = Literal["new", "failed", "started", "done"]


def _sql_tx(tx: store_base.Tx) -> store_sql.SqlTx:
    if not isinstance(tx, store_sql.SqlTx):
        raise errors.ConfigurationError(
            f"connectors that record effects need a SQL store, not {type(tx).__name__}"
        )
    return tx


Where = tuple[str, int] | None
"""The (run id, seq) of the step making the call: its recorded result is sealed with the
run's data key, as the step's own result is."""


async def _claim_effect_txn(
    tx: store_base.Tx, connector: str, key: str, refuse_uncertain: bool, where: Where = None
) -> tuple[Prior, str | None]:
    """Claim ``(connector, key)`` before the call goes out. Returns what was there before
    (``new``, ``failed``, ``started``, ``done``) and, for ``done``, the recorded output.
    The claim marks the row ``started`` (not for ``done``, nor for a refused ``started``)."""
    t = _sql_tx(tx)
    await t._run(
        "INSERT INTO connector_effects (connector, idempotency_key, status, attempts, result,"
        " created_at, updated_at) VALUES (?, ?, 'started', 0, NULL, ?, ?)"
        " ON CONFLICT (connector, idempotency_key) DO NOTHING",
        (connector, key, t.now, t.now),
    )
    row = await t._one(
        "SELECT status, attempts, result FROM connector_effects"
        " WHERE connector = ? AND idempotency_key = ?{update}",
        (connector, key),
    )
    if row is None:  # pragma: no cover - inserted just above
        raise errors.StoreError(f"connector_effects lost the row of {connector}/{key}")
    status, attempts = str(row[0]), int(row[1])
    prior: Prior = "new" if attempts == 0 else status  # type: ignore[assignment]
    if prior == "done":
        if row[2] is not None and where is not None:
            return prior, await t._open(where[0], where[1], "connector:" + connector, row[2])
        return prior, None if row[2] is None else str(row[2])
    if prior == "started" and refuse_uncertain:
        return prior, None
    await t._run(
        "UPDATE connector_effects SET status = 'started', attempts = attempts + 1,"
        " updated_at = ? WHERE connector = ? AND idempotency_key = ?",
        (t.now, connector, key),
    )
    tx.audit(
        CLAIM_ACTION,
        f"connector:{connector}",
        {"idempotency_key": key, "prior": prior, "attempt": attempts + 1},
    )
    return prior, None


async def _settle_effect_txn(
    tx: store_base.Tx,
    connector: str,
    key: str,
    status: str,
    result: str | None,
    where: Where = None,
) -> None:
    t = _sql_tx(tx)
    if where is not None:
        result = await t._seal(where[0], where[1], "connector:" + connector, result)
    await t._run(
        "UPDATE connector_effects SET status = ?, result = ?, updated_at = ?"
        " WHERE connector = ? AND idempotency_key = ?",
        (status, result, t.now, connector, key),
    )


# -- the connector ---------------------------------------------------------------------------
class Connector(ABC):
    """A typed, idempotent, audited adapter to another system (see the module docstring).

    Subclasses implement `_perform` (one attempt of one operation) and `target` (where it
    goes, without credentials), and list their credentials in `secrets`."""

    kind: ClassVar[str] = "connector"
    records_effects: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        app: App,
        *,
        timeout: float = 30.0,
        retry: TransportRetry | None = None,
        rate: TokenBucket | None = None,
        on_uncertain: Literal["resend", "refuse"] = "resend",
    ) -> None:
        if not _NAME.match(name):
            raise errors.ConfigurationError(
                f"connector name {name!r}: use lower-case letters, digits, '_', '.', '-'"
            )
        if timeout <= 0:
            raise errors.ConfigurationError(f"connector {name!r}: timeout must be > 0")
        if on_uncertain not in ("resend", "refuse"):
            raise errors.ConfigurationError(
                f"connector {name!r}: on_uncertain is 'resend' or 'refuse'"
            )
        self.name = name
        self.app = app
        self.timeout = float(timeout)
        self.retry = retry or TransportRetry()
        self.rate = rate
        self.on_uncertain = on_uncertain
        # Calls made by each running step attempt, keyed by the identity of its StepInfo
        # (a new object per attempt; the entry keeps it alive, so the id is not reused).
        # By value, a run recovered by this same process would continue the old count.
        self._calls: collections.OrderedDict[int, tuple[context.StepInfo, int]] = (
            collections.OrderedDict()
        )

    # -- what a connector provides ---------------------------------------------------------
    @abstractmethod
    def target(self, op: Operation[Any, Any], data: pydantic.BaseModel) -> str:
        """Where the call goes, for the audit record and logs (no credentials)."""

    @abstractmethod
    async def _perform(self, op: Operation[Any, Any], data: Any, call: Call) -> Outcome:
        """One attempt. Raise `Transient` for what a retry may fix, a `flowdesk.Permanent`
        error (`ConnectorRejected` ...) for what it cannot."""

    def secrets(self) -> Sequence[secrets_.Secret]:
        """The connector's credentials, scrubbed from audit data, logs and errors."""
        return ()

    async def aclose(self) -> None:  # noqa: B027 - optional: not every connector holds any
        """Release connections (clients, pools)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def scrub(self, text: str) -> str:
        return secrets_.scrub(text, self.secrets())

    # -- the call ----------------------------------------------------------------------------
    async def call(
        self,
        op: Operation[I, O],
        data: I | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> O:
        """Carry out ``op`` with ``data``; returns the output model. See the module docstring
        for the key, the retries, the rate limit, the timeout and the audit record."""
        step = context.current_step()
        key = idempotency_key or self._key(step)
        started = time.monotonic()
        record: dict[str, Any] = {
            "connector": self.name,
            "kind": self.kind,
            "operation": op.name,
            "target": None,
            "idempotency_key": key,
            "run_id": None if step is None else step.run_id,
            "seq": None if step is None else step.seq,
            "step": None if step is None else step.name,
            "input_sha256": None,
            "output_sha256": None,
            "attempts": 0,
            "retries": [],
        }
        try:
            model = self._input(op, data)
        except errors.ConnectorInputRefused as exc:
            await self._audit(record, "refused", type(exc).__name__, started)
            raise
        payload = model.model_dump(mode="json")
        record["input_sha256"] = digest(payload)
        record["target"] = self.target(op, model)
        if self.records_effects:
            prior, recorded = await self._claim(key, _where(record))
            if prior == "done":
                output = self._output(op, None if recorded is None else json.loads(recorded))
                record["output_sha256"] = digest(output.model_dump(mode="json"))
                await self._audit(record, "duplicate", "recorded effect returned", started)
                return output
            if prior == "started" and self.on_uncertain == "refuse":
                await self._audit(record, "refused", "EffectUncertain", started)
                raise errors.EffectUncertain(
                    f"connector {self.name!r}: an earlier call with key {key!r} started and "
                    "never reported back, so it may have had its effect. Check the target; "
                    "then set the connector_effects row to 'done' with result holding the "
                    "operation's output as JSON (it happened) or to 'failed' (it did not), "
                    "and retry the run.",
                    connector=self.name,
                    operation=op.name,
                )
        observer = getattr(self.app, "observer", None)
        span = nullcontext() if observer is None else observer.connector_call(self.name, op.name)
        try:
            with span:
                outcome = await self._attempts(op, model, key, step, record)
            output = self._output(op, outcome.value)
        except BaseException as exc:
            # Did the effect maybe happen? Not when the target refused, nor when the
            # transport failed before anything went out.
            uncertain = getattr(exc, "maybe_done", True) and not isinstance(
                exc, (errors.ConnectorRejected, errors.ConnectorInputRefused)
            )
            effect = "started" if uncertain else "failed"
            try:
                await self._audit(record, "error", type(exc).__name__, started, effect=effect)
            except Exception as audit_exc:  # the call's own error is what the step must see
                log.warning(
                    "connector %s: could not audit a failed call (%s); raising its error",
                    self.name,
                    type(audit_exc).__name__,
                )
            raise
        out_json = output.model_dump(mode="json")
        record["output_sha256"] = digest(out_json)
        await self._audit(
            record, "ok", outcome.detail, started, effect="done", result=json.dumps(out_json)
        )
        return output

    def _key(self, step: context.StepInfo | None) -> str:
        if step is None:
            raise errors.ConfigurationError(
                f"connector {self.name!r} was called outside a step: call it from an "
                "@app.step function (its run's idempotency key goes to the target), or pass "
                "idempotency_key= yourself."
            )
        slot = id(step)
        _, before = self._calls.get(slot, (step, 0))
        n = before + 1
        self._calls[slot] = (step, n)
        self._calls.move_to_end(slot)
        while len(self._calls) > _KEYS_REMEMBERED:
            self._calls.popitem(last=False)
        return step.idempotency_key if n == 1 else f"{step.idempotency_key}/{n}"

    def _input(self, op: Operation[I, Any], data: I | Mapping[str, Any]) -> I:
        if isinstance(data, op.input):
            model = data
        else:
            raw = data.model_dump() if isinstance(data, pydantic.BaseModel) else data
            try:
                model = op.input.model_validate(raw)
            except pydantic.ValidationError as exc:
                fields = ", ".join(
                    ".".join(str(p) for p in e["loc"]) or "(input)" for e in exc.errors()
                )
                raise errors.ConnectorInputRefused(
                    f"connector {self.name!r}, operation {op.name!r}: the input does not fit "
                    f"{op.input.__name__} (fields: {fields}).",
                    connector=self.name,
                    operation=op.name,
                ) from None
        problem = self._credential_in(model.model_dump(mode="json"), (), op.allow_fields)
        if problem is not None:
            raise errors.ConnectorInputRefused(
                f"connector {self.name!r}, operation {op.name!r}: the input {problem}. "
                "Credentials never come from workflow input: configure them on the connector "
                "from the environment or a secrets file (flowdesk.connectors.secrets).",
                connector=self.name,
                operation=op.name,
            )
        return model

    def _credential_in(
        self, value: Any, path: tuple[str, ...], allowed: frozenset[str]
    ) -> str | None:
        where = ".".join(path) or "(input)"
        if isinstance(value, dict):
            for k, v in value.items():
                if credential_key(str(k)) and str(k) not in allowed:
                    return f"has a field named like a credential ({'.'.join((*path, str(k)))})"
                found = self._credential_in(v, (*path, str(k)), allowed)
                if found:
                    return found
        elif isinstance(value, list):
            for i, v in enumerate(value):
                found = self._credential_in(v, (*path, str(i)), allowed)
                if found:
                    return found
        elif isinstance(value, str):
            if _CREDENTIAL_VALUE.match(value):
                return f"holds a credential-like value at {where}"
            if secrets_.scrub(value, self.secrets()) != value:
                return f"holds one of the connector's secrets at {where}"
        return None

    def _output(self, op: Operation[Any, O], value: Any) -> O:
        if isinstance(value, op.output):
            return value
        try:
            if isinstance(value, pydantic.BaseModel):
                value = value.model_dump()
            return op.output.model_validate(value)
        except pydantic.ValidationError as exc:
            fields = ", ".join(
                ".".join(str(p) for p in e["loc"]) or "(answer)" for e in exc.errors()
            )
            raise errors.BadTargetResponse(
                f"connector {self.name!r}, operation {op.name!r}: the answer does not fit "
                f"{op.output.__name__} (fields: {fields}). The call itself went through.",
                connector=self.name,
                operation=op.name,
            ) from None

    async def _attempts(
        self,
        op: Operation[Any, Any],
        model: pydantic.BaseModel,
        key: str,
        step: context.StepInfo | None,
        record: dict[str, Any],
    ) -> Outcome:
        attempt = 0
        while True:
            attempt += 1
            record["attempts"] = attempt
            if self.rate is not None:
                await self.rate.acquire()
            call = Call(self.name, op.name, key, attempt, step)
            try:
                return await asyncio.wait_for(self._perform(op, model, call), self.timeout)
            except TimeoutError:
                failure = Transient(f"no answer within {self.timeout:g} s", maybe_done=True)
            except Transient as exc:
                failure = exc
            reason = self.scrub(failure.reason)
            if failure.maybe_done and self.records_effects and self.on_uncertain == "refuse":
                wait = None
            else:
                wait = self.retry.wait(attempt, failure.retry_after)
            if wait is None:
                after = failure.retry_after
                exc_out = errors.ConnectorUnavailable(
                    f"connector {self.name!r}, operation {op.name!r} to "
                    f"{record['target']}: {reason} (after {attempt} attempt(s)"
                    + (f"; the target asks to wait {after:g} s" if after is not None else "")
                    + "). The step's retry policy may try again.",
                    connector=self.name,
                    operation=op.name,
                    retry_after=after,
                    maybe_done=failure.maybe_done,
                )
                raise exc_out from None
            record["retries"].append({"reason": reason, "wait_s": round(wait, 3)})
            log.warning(
                "connector %s: %s to %s failed (%s); retry %d in %.2f s",
                self.name,
                op.name,
                record["target"],
                reason,
                attempt,
                wait,
            )
            await asyncio.sleep(wait)

    async def _claim(self, key: str, where: Where = None) -> tuple[Prior, str | None]:
        refuse = self.on_uncertain == "refuse"
        name = self.name
        result: tuple[Prior, str | None] = await self.app.submit(
            lambda tx: _claim_effect_txn(tx, name, key, refuse, where), actor=self.actor
        )
        return result

    @property
    def actor(self) -> str:
        return f"system:connector:{self.name}"

    async def _audit(
        self,
        record: dict[str, Any],
        status: str,
        detail: str,
        started: float,
        *,
        effect: str | None = None,
        result: str | None = None,
    ) -> None:
        data = dict(record)
        data["status"] = status
        data["detail"] = detail
        data["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        data = _scrub_value(data, list(self.secrets()))
        name, key = self.name, str(record["idempotency_key"])
        settle = effect if self.records_effects and effect is not None else None
        where = _where(record)

        async def op(tx: store_base.Tx) -> None:
            if settle is not None:
                await _settle_effect_txn(tx, name, key, settle, result, where)
            # The audit commits to keyed digests of what went out and came back: a bare
            # hash of personal data could be confirmed by guessing.
            keyed = dict(data)
            for field in ("input_sha256", "output_sha256"):
                if isinstance(tx, store_sql.SqlTx):
                    keyed[field] = await tx.keyed_digest(keyed.get(field))
            tx.audit(AUDIT_ACTION, f"connector:{name}", keyed)

        log.debug(
            "connector %s: %s %s -> %s (%s) in %.1f ms, %d attempt(s), key %s",
            name,
            data["operation"],
            data["target"],
            status,
            detail,
            data["duration_ms"],
            data["attempts"],
            key,
        )
        await self.app.submit(op, actor=self.actor)
