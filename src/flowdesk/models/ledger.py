"""Usage and cost of every model call: the price table, the ledger, and its metrics.

`Ledger` is a gateway interceptor (`flowdesk.models.gateway.Interceptor`). Around each
provider call the gateway makes (the answer's, a fallback's, a canary's, a shadow's) it

1. prices the call with the `Prices` table (``[prices.MODEL]`` in the gateway's TOML:
   ``per_1k_in`` and ``per_1k_out`` USD per thousand tokens, ``per_call`` USD per call, for
   local models that count no tokens); a model not in the table keeps the price of its
   ``[models.NAME]`` entry (``price_in_per_mtok``/``price_out_per_mtok``). The priced cost
   replaces the outcome's, so ``Answer.cost_usd`` and the budgets see the same figure;
2. appends a row to the store's ``model_ledger`` (run id, seq, workflow, task, model,
   provider, version, role, tokens, cost, latency, confidence, status; never the text);
3. reports the call to ``flowdesk.observe.metrics.record_model_call`` when that module is
   installed.

The row is written without waiting: `Writes.submit` queues the operation on the app's
group-commit writer (`flowdesk.engine.writer.Writer.enqueue`) and returns. Inside
``ctx.model`` the gateway returns to the engine without suspending in between, so the
engine's write of the step's recorded answer joins the same group commit: the ledger row
rides the step's transaction and costs no commit of its own (the row of a call made
before the answering one, a model that failed before a fallback, joins whichever group
commit comes next). A process
killed before that commit loses the row together with the step record; the step then
runs again and is recorded again, with its new call. The ledger insert locks no row, so
it never makes a group commit wait. `Writes.flush` waits for what is in flight (the CLI
and tests use it).

Reading: `usage` sums calls, tokens and cost per run, workflow, task or model; `calls`
lists a run's calls one by one (``flowdesk models usage``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from flowdesk import errors
from flowdesk.models import base
from flowdesk.models import config as cfg
from flowdesk.models.gateway import CallNext, CallOutcome, ModelCall
from flowdesk.store import base as store_base
from flowdesk.store import sql_models

if TYPE_CHECKING:
    from flowdesk.engine.app import App

log = logging.getLogger("flowdesk.models.ledger")

T = TypeVar("T")

NANO = 1_000_000_000  # nano-dollars per dollar: budgets count in integers
_OUT_TOKENS = {"classify": 32, "generate": 512, "embed": 0}  # when no max_tokens is set


class Price(BaseModel):
    """What one model costs (USD). Every part defaults to 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_1k_in: float = Field(default=0.0, ge=0)
    per_1k_out: float = Field(default=0.0, ge=0)
    per_call: float = Field(default=0.0, ge=0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return self.per_call + (tokens_in * self.per_1k_in + tokens_out * self.per_1k_out) / 1000


class Prices:
    """The price table: ``[prices.MODEL]`` entries, else the model's config prices."""

    def __init__(self, table: Mapping[str, Price] | None = None) -> None:
        self.table: dict[str, Price] = dict(table or {})

    def cost(self, model: str, spec: cfg.ModelConfig, tokens_in: int, tokens_out: int) -> float:
        price = self.table.get(model)
        if price is None:
            return spec.cost(tokens_in, tokens_out)
        return price.cost(tokens_in, tokens_out)

    def estimate(self, call: ModelCall) -> float:
        """The call's cost before it is made: input tokens estimated from its text (as the
        gateway's router does), output tokens from ``max_tokens`` (else a default per
        capability). Budgets reserve this much and settle to the real cost after."""
        request = call.request
        system = request.hints.get("system") or ""
        tokens_in = math.ceil((len(request.text) + len(str(system)) + 200) / 4)
        tokens_out = request.max_tokens or _OUT_TOKENS.get(request.capability, 0)
        return self.cost(call.model, call.spec, tokens_in, tokens_out)


def to_nano(usd: float, *, up: bool = False) -> int:
    """USD as integer nano-dollars (rounded up with ``up``: a reservation never falls
    short of the estimate)."""
    value = usd * NANO
    return math.ceil(value - 1e-6) if up else round(value)


def role_of(call: ModelCall) -> sql_models.Role:
    if call.shadow:
        return "shadow"
    return "canary" if call.canary else "current"


Op = Callable[[store_base.Tx], Awaitable[Any]]


class Writes:
    """Writes that nobody waits for: each is queued on the app's group-commit writer at
    once (`Writer.enqueue`), so it joins whatever commits next, usually the step's own
    record; a failure is logged, never raised into the model call."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._pending: set[asyncio.Future[Any]] = set()

    def submit(self, op: Op, what: str) -> None:
        # Never `app.open()` here: a write made while the app closes must not open its
        # store again; it is dropped (and logged) instead.
        try:
            fut = self.app.writer.enqueue(op)
        except Exception:
            log.exception("could not record %s", what)
            return
        self._pending.add(fut)
        fut.add_done_callback(functools.partial(self._done, what=what))

    def _done(self, fut: asyncio.Future[Any], what: str) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("could not record %s: %s: %s", what, type(exc).__name__, exc)

    async def flush(self) -> None:
        """Wait until every write submitted so far is committed (or failed)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._pending)


def row_locks(app: App) -> bool:
    """Does the app's store lock rows (PostgreSQL)? SQLite serializes whole writers, so
    no two of its transactions can ever wait on each other."""
    store = sql_models.models_store(app.store)
    return bool(store.dialect.update)


async def transact_alone(
    app: App, op: Op, actor: str | None = None, *, open_app: bool = True
) -> Any:
    """Apply ``op`` and return its result (or raise its error), in a transaction that
    holds no other operation where the store locks rows.

    Budget rows, rate-limit keys and drift states are hot rows: every process updates
    them. A group commit of the engine's writer holds the locks of all its operations
    until it commits, in the order they arrived, so two such batches could take two hot
    rows in opposite orders and deadlock (the whole batch, step records included, would be
    rolled back and redone). Alone, an operation takes its rows in the sorted order it
    uses for them, and waits never form a cycle. On SQLite it joins the group commit.
    Without ``open_app`` a closed app is an error (`StoreError`), not opened again."""
    if open_app:
        await app.open()

    async def acting(tx: store_base.Tx) -> Any:
        if actor is not None:
            tx.actor = actor
        return await op(tx)

    if not row_locks(app):
        return await app.writer.submit(acting)
    [result] = await app.store.transact([acting])
    if isinstance(result, BaseException):
        raise result
    return result


class Batcher(Generic[T]):
    """Items for hot rows gathered for ``delay`` seconds, then applied together by
    ``apply(tx, items)`` in one `transact_alone` transaction (which sorts them by row).
    Nobody waits for it; a failure is logged. `flush` applies what is gathered now."""

    def __init__(
        self,
        app: App,
        apply: Callable[[sql_models.ModelsTx, list[T]], Awaitable[None]],
        what: str,
        *,
        delay: float = 0.05,
    ) -> None:
        self.app = app
        self.what = what
        self.delay = delay
        self._apply = apply
        self._items: list[T] = []
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def add(self, item: T) -> None:
        self._items.append(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._later())
            self._running.add(self._task)
            self._task.add_done_callback(self._running.discard)

    async def _later(self) -> None:
        await asyncio.sleep(self.delay)
        self._task = None
        await self._apply_now()

    async def _apply_now(self) -> None:
        items, self._items = self._items, []
        if not items:
            return

        async def op(tx: store_base.Tx) -> None:
            await self._apply(sql_models.models_tx(tx), items)

        try:
            await transact_alone(self.app, op, open_app=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not record %d %s", len(items), self.what)

    async def flush(self) -> None:
        """Apply everything gathered so far, and wait for what is being applied."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await asyncio.gather(*list(self._running), return_exceptions=True)
        await self._apply_now()

    @property
    def pending(self) -> int:
        return len(self._items)


def _metrics_hook() -> Callable[..., None] | None:
    """``flowdesk.observe.metrics.record_model_call`` if that module is installed."""
    try:
        module = importlib.import_module("flowdesk.observe.metrics")
    except ImportError:
        return None
    hook = getattr(module, "record_model_call", None)
    return hook if callable(hook) else None


class Ledger:
    """The gateway interceptor that prices and records every provider call (see the
    module docstring). Put it last in ``interceptors``, so it sees only calls that went
    out (a refused call costs nothing and is not a call). Calls made while ``app`` is not
    open (`Gateway.ask` outside a worker, before ``await app.open()``) are priced but not
    recorded (logged)."""

    def __init__(self, app: App, prices: Prices | None = None, *, metrics: bool = True) -> None:
        self.app = app
        self.prices = prices or Prices()
        self.writes = Writes(app)
        self._metrics = _metrics_hook() if metrics else None

    async def __call__(self, call: ModelCall, next: CallNext) -> CallOutcome:
        started = time.perf_counter()
        try:
            outcome = await next(call)
        except errors.ModelError as exc:
            latency = (time.perf_counter() - started) * 1000
            self._record(call, None, latency, exc)
            raise
        result = outcome.result
        cost = self.prices.cost(call.model, call.spec, result.tokens_in, result.tokens_out)
        if cost != outcome.cost_usd:
            outcome = replace(outcome, cost_usd=cost)
        self._record(call, outcome, outcome.latency_ms, None)
        return outcome

    def _record(
        self,
        call: ModelCall,
        outcome: CallOutcome | None,
        latency_ms: float,
        failure: errors.ModelError | None,
    ) -> None:
        result: base.ProviderResult | None = None if outcome is None else outcome.result
        row = sql_models.LedgerRow(
            at=store_base.now_ms(),
            run_id=call.run_id,
            seq=call.seq,
            workflow=call.workflow,
            task=call.task,
            model=call.model,
            provider=call.provider,
            version=(
                result.version
                if result is not None
                else call.request.version or call.spec.current_version
            ),
            role=role_of(call),
            status="ok" if failure is None else "error",
            error=None if failure is None else type(failure).__name__,
            tokens_in=0 if result is None else result.tokens_in,
            tokens_out=0 if result is None else result.tokens_out,
            cost_usd=0.0 if outcome is None else outcome.cost_usd,
            latency_ms=round(latency_ms, 3),
            confidence=None if result is None else result.confidence,
        )

        async def op(tx: store_base.Tx) -> None:
            await sql_models.models_tx(tx).record_model_calls([row])

        self.writes.submit(op, f"the usage of a {call.task!r} call")
        if self._metrics is not None:
            try:
                self._metrics(
                    call.task,
                    call.model,
                    latency_ms / 1000,
                    row.confidence,
                    row.cost_usd,
                    workflow=call.workflow,
                )
            except Exception:
                log.exception("model call metrics failed")


# -- reading ----------------------------------------------------------------------------


async def usage(
    app: App,
    *,
    by: Sequence[str] = ("workflow", "task", "model"),
    run_id: str | None = None,
    workflow: str | None = None,
    task: str | None = None,
    since: int | None = None,
) -> list[sql_models.UsageRow]:
    """Calls, tokens, cost and latency of the ledger summed per ``by`` (any of
    ``sql_models.USAGE_GROUPS``), for one run, workflow or task, since ``since`` (epoch
    ms)."""
    await app.open()
    store = sql_models.models_store(app.store)
    return await store.model_usage(by=by, run_id=run_id, workflow=workflow, task=task, since=since)


async def calls(app: App, run_id: str) -> list[sql_models.LedgerRow]:
    """Every call the run's model steps made, in order."""
    await app.open()
    return await sql_models.models_store(app.store).model_calls(run_id=run_id)


async def cost(app: App, *, run_id: str | None = None, workflow: str | None = None) -> float:
    """What a run (or a workflow, or everything) has spent on models, in USD."""
    rows = await usage(app, by=(), run_id=run_id, workflow=workflow)
    return sum(r.cost_usd for r in rows)
