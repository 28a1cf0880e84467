"""Cost budgets and shared rate limits, enforced before each model call in every process.

`Budgets` is a gateway interceptor. Before a provider call goes out it takes, in ONE store
transaction, a slot of every rate limit and a reservation of every budget that applies to
the call; if any refuses, nothing is taken and the call is refused with `BudgetExceeded`.
The store makes both exact across every worker process that shares it (see
`flowdesk.store.sql_models`): a budget is a conditional upsert ``spent + estimate <=
limit`` on its (scope, window) row, a rate limit a sliding-window log per key. After the
call the reservation settles to the priced cost (`ledger.Prices`), or is given back when
the call failed; that write joins the next group commit and is not waited for.

In the gateway's TOML::

    [[budgets]]                  # per task, per workflow, per model, or all calls
    scope = "task"               # task | workflow | model | all
    name = "ticket_category"     # which one ("*": each one separately); not for "all"
    limit_usd = 5.0
    window = "day"               # hour | day | month (UTC) | total
    on_exceed = "refuse"         # refuse: the call fails with BudgetExceeded, no other
                                 # model of the chain is tried; fallback: the gateway
                                 # moves down the chain, and a cheaper model whose estimate
                                 # still fits (a local one priced 0 always does) answers

    [[limits]]                   # shared rate limits: hold across every worker process
    scope = "provider"           # model | provider | task | all
    name = "openai"              # "*": each one separately
    calls = 10
    per_s = 60                   # at most `calls` calls in any `per_s` seconds
    wait_s = 0                   # wait this long for a free slot at most, else refuse
                                 # (and the gateway falls back down the chain)

A budget checks the call's *estimate* (input tokens from the text, output tokens from
``max_tokens``), so a call that costs more than estimated can take a budget slightly
over its limit; the next call then finds it spent. Shadow calls count against budgets
and limits like any other call (they cost the same); a refused shadow only loses its
comparison.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowdesk import errors
from flowdesk.models import ledger
from flowdesk.models.gateway import CallNext, CallOutcome, ModelCall
from flowdesk.store import base as store_base
from flowdesk.store import sql_models

if TYPE_CHECKING:
    from flowdesk.engine.app import App

log = logging.getLogger("flowdesk.models.budgets")

Window = Literal["hour", "day", "month", "total"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    """One ``[[budgets]]`` entry (see the module docstring)."""

    scope: Literal["task", "workflow", "model", "all"]
    name: str | None = None
    limit_usd: float = Field(gt=0)
    window: Window = "day"
    on_exceed: Literal["refuse", "fallback"] = "refuse"

    @model_validator(mode="after")
    def _named(self) -> Budget:
        if self.scope == "all" and self.name is not None:
            raise ValueError("a budget of scope 'all' takes no name")
        if self.scope != "all" and not self.name:
            raise ValueError(f"a budget of scope {self.scope!r} needs a name (or '*')")
        return self


class RateLimit(_Strict):
    """One ``[[limits]]`` entry (see the module docstring)."""

    scope: Literal["model", "provider", "task", "all"]
    name: str | None = None
    calls: int = Field(ge=1)
    per_s: float = Field(gt=0)
    wait_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _named(self) -> RateLimit:
        if self.scope == "all" and self.name is not None:
            raise ValueError("a limit of scope 'all' takes no name")
        if self.scope != "all" and not self.name:
            raise ValueError(f"a limit of scope {self.scope!r} needs a name (or '*')")
        return self


def window_start(window: Window, now_ms: int) -> int:
    """The epoch ms at which the UTC ``window`` holding ``now_ms`` began (0: ``total``)."""
    if window == "total":
        return 0
    at = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    if window == "hour":
        at = at.replace(minute=0, second=0, microsecond=0)
    elif window == "day":
        at = at.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        at = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(at.timestamp() * 1000)


def _subject(scope: str, call: ModelCall) -> str | None:
    if scope == "task":
        return call.task
    if scope == "workflow":
        return call.workflow
    if scope == "model":
        return call.model
    if scope == "provider":
        return call.provider
    return "*"


def _key(scope: str, name: str | None, call: ModelCall) -> str | None:
    """The store key of a budget or limit for this call, None when it does not apply."""
    if scope == "all":
        return "all"
    subject = _subject(scope, call)
    if subject is None or (name != "*" and name != subject):
        return None
    return f"{scope}:{subject}"


@dataclass(frozen=True, slots=True)
class _Charge:
    budget: Budget
    key: str
    window_start: int
    limit_nusd: int


@dataclass(frozen=True, slots=True)
class _Slot:
    limit: RateLimit
    key: str


class _Refused(Exception):
    """Raised inside the reservation transaction: roll it back, nothing is taken."""

    def __init__(self, charge: _Charge | None, slot: _Slot | None, free_at: int | None) -> None:
        super().__init__()
        self.charge = charge
        self.slot = slot
        self.free_at = free_at


# The call refused by a budget with on_exceed = "refuse": (task, run id, seq, models
# refused so far). The gateway walks a task's chain in the caller's task, so the later
# models of the same call see it and are refused too (see `Budgets._refuse_rest`).
_REFUSING: contextvars.ContextVar[tuple[str, str | None, int | None, frozenset[str]] | None] = (
    contextvars.ContextVar("flowdesk_budget_refusing", default=None)
)


class Budgets:
    """The gateway interceptor that enforces ``budgets`` and shared rate ``limits``
    (see the module docstring). Put it before `ledger.Ledger` in ``interceptors``."""

    def __init__(
        self,
        app: App,
        budgets: Sequence[Budget] = (),
        limits: Sequence[RateLimit] = (),
        prices: ledger.Prices | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.app = app
        self.budgets = list(budgets)
        self.limits = list(limits)
        self.prices = prices or ledger.Prices()
        self.settlements: ledger.Batcher[tuple[str, int, int]] = ledger.Batcher(
            app, _apply_settlements, "budget settlements"
        )
        self._clock = clock
        self._sleep = sleep
        self.refused = 0  # calls refused by this process (budgets and limits)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def charges(self, call: ModelCall, now_ms: int) -> list[_Charge]:
        found: dict[tuple[str, int], _Charge] = {}
        for budget in self.budgets:
            key = _key(budget.scope, budget.name, call)
            if key is None:
                continue
            start = window_start(budget.window, now_ms)
            limit = ledger.to_nano(budget.limit_usd)
            old = found.get((key, start))
            if old is None or limit < old.limit_nusd:  # two entries on one row: the lower
                found[(key, start)] = _Charge(budget, key, start, limit)
        return sorted(found.values(), key=lambda c: (c.key, c.window_start))

    def slots(self, call: ModelCall) -> list[_Slot]:
        found: dict[str, _Slot] = {}
        for limit in self.limits:
            key = _key(limit.scope, limit.name, call)
            if key is None:
                continue
            key = f"{key}/{limit.calls}/{limit.per_s:g}"
            found.setdefault(key, _Slot(limit, key))
        return sorted(found.values(), key=lambda s: s.key)

    async def __call__(self, call: ModelCall, next: CallNext) -> CallOutcome:
        self._refuse_rest(call)
        charges = self.charges(call, self._now_ms())
        slots = self.slots(call)
        if not charges and not slots:
            return await next(call)
        amount = ledger.to_nano(self.prices.estimate(call), up=True) if charges else 0
        await self._take(call, charges, slots, amount)
        try:
            outcome = await next(call)
        except BaseException:
            self._settle(charges, -amount)  # the call failed: give the reservation back
            raise
        self._settle(charges, ledger.to_nano(outcome.cost_usd) - amount)
        return outcome

    def _refuse_rest(self, call: ModelCall) -> None:
        """Refuse a later model of a call a budget refused with ``on_exceed = "refuse"``.
        Within a workflow the call is (run id, seq); outside one, a model the gateway asks
        again means a new call."""
        mark = _REFUSING.get()
        if mark is None or call.shadow:
            return
        task, run_id, seq, models = mark
        same = task == call.task and (
            (run_id is not None and (run_id, seq) == (call.run_id, call.seq))
            or (run_id is None and call.run_id is None and call.model not in models)
        )
        if not same:
            _REFUSING.set(None)
            return
        _REFUSING.set((task, run_id, seq, models | {call.model}))
        self.refused += 1
        raise errors.BudgetExceeded(
            f"Model {call.model!r} was not asked for task {call.task!r}: a budget of this "
            "call is spent and set to on_exceed = 'refuse'."
        )

    async def _take(
        self, call: ModelCall, charges: list[_Charge], slots: list[_Slot], amount: int
    ) -> None:
        waited = 0.0
        while True:
            for charge in charges:  # an estimate over the whole limit never fits
                if amount > charge.limit_nusd:
                    raise self._refusal(call, _Refused(charge, None, None), amount)

            async def op(tx: store_base.Tx) -> None:
                mtx = sql_models.models_tx(tx)
                for slot in slots:
                    free_at = await mtx.take_rate_slot(
                        slot.key, slot.limit.calls, int(slot.limit.per_s * 1000)
                    )
                    if free_at is not None:
                        raise _Refused(None, slot, free_at)
                for charge in charges:
                    if not await mtx.reserve_budget(
                        charge.key, charge.window_start, amount, charge.limit_nusd
                    ):
                        raise _Refused(charge, None, None)

            try:
                await ledger.transact_alone(self.app, op)
                return
            except _Refused as refused:
                if refused.slot is not None and refused.free_at is not None:
                    delay = max(0.0, (refused.free_at - self._now_ms()) / 1000)
                    delay += random.uniform(0.001, 0.02)  # several waiters: spread the retries
                    if waited + delay <= refused.slot.limit.wait_s:
                        waited += delay
                        await self._sleep(delay)
                        continue
                raise self._refusal(call, refused, amount) from None

    def _refusal(self, call: ModelCall, refused: _Refused, amount: int) -> errors.BudgetExceeded:
        self.refused += 1
        if refused.slot is not None:
            limit = refused.slot.limit
            wait = ""
            if refused.free_at is not None:
                wait = f" A slot frees in {max(0, refused.free_at - self._now_ms()) / 1000:.1f} s."
            return errors.BudgetExceeded(
                f"Rate limit {refused.slot.key.split('/')[0]!r} refused model {call.model!r} "
                f"for task {call.task!r}: {limit.calls} calls per {limit.per_s:g} s across "
                f"every worker are taken.{wait} Raise the limit's calls, or set wait_s to "
                "wait for a slot."
            )
        charge = refused.charge
        assert charge is not None
        budget = charge.budget
        if budget.on_exceed == "refuse" and not call.shadow:
            _REFUSING.set((call.task, call.run_id, call.seq, frozenset({call.model})))
        return errors.BudgetExceeded(
            f"Budget {charge.key!r} ({budget.window} window) refused model {call.model!r} "
            f"for task {call.task!r}: this call's estimate of {amount / ledger.NANO:.6f} USD "
            f"does not fit in what is left of {budget.limit_usd:g} USD. Wait for the next "
            "window, raise limit_usd, or set on_exceed = 'fallback' to let a cheaper model "
            "of the chain answer."
        )

    def _settle(self, charges: list[_Charge], delta: int) -> None:
        if delta:
            for charge in charges:
                self.settlements.add((charge.key, charge.window_start, delta))

    async def status(self) -> list[BudgetStatus]:
        """Every configured budget's spend in its current window (``*`` budgets: each
        subject that has spent)."""
        await self.app.open()
        await self.settlements.flush()
        now = self._now_ms()
        rows = await sql_models.models_store(self.app.store).budget_usage()
        out: list[BudgetStatus] = []
        for budget in self.budgets:
            start = window_start(budget.window, now)
            if budget.scope == "all":
                keys = ["all"]
            elif budget.name == "*":
                prefix = budget.scope + ":"
                keys = sorted({r.scope for r in rows if r.scope.startswith(prefix)})
            else:
                keys = [f"{budget.scope}:{budget.name}"]
            for key in keys:
                spent = next(
                    (r.spent_nusd for r in rows if r.scope == key and r.window_start == start), 0
                )
                out.append(
                    BudgetStatus(
                        key=key,
                        window=budget.window,
                        window_start=start,
                        limit_usd=budget.limit_usd,
                        spent_usd=spent / ledger.NANO,
                        on_exceed=budget.on_exceed,
                    )
                )
        return out


async def _apply_settlements(tx: sql_models.ModelsTx, items: list[tuple[str, int, int]]) -> None:
    """Sum the deltas per budget row and apply them in row order (see
    `ledger.transact_alone`)."""
    sums: dict[tuple[str, int], int] = {}
    for key, start, delta in items:
        sums[(key, start)] = sums.get((key, start), 0) + delta
    for (key, start), delta in sorted(sums.items()):
        await tx.settle_budget(key, start, delta)


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStatus:
    key: str
    window: Window
    window_start: int
    limit_usd: float
    spent_usd: float
    on_exceed: str

    @property
    def left_usd(self) -> float:
        return max(0.0, self.limit_usd - self.spent_usd)
