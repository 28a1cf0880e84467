"""Shared model limits hold across worker processes: three real ``flowdesk worker``
processes on one database (one SQLite file; one PostgreSQL database) share a rate limit
of 10 calls per hour (a window no run of this test outlives) and a budget of 0.05 USD.
Of 30 runs that each make one call to the rate-limited model, exactly 10 are answered
and 20 refused with ``BudgetExceeded``; of 12 runs of a model priced 0.01 USD per call,
exactly 5 are answered. The answers come from more than one process, and ``flowdesk
models usage`` reports the spend per workflow.

This module is also the app the workers run (``--app acceptance.test_shared_limits:app``):
the gateway is wired at import with `flowdesk.models.rollout.wire`.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import flowdesk
from flowdesk.models import base, rollout

from .conftest import HERE, Flow, Proc
from .pg_fixtures import PgFlow, pg_flow  # noqa: F401

APP = "acceptance.test_shared_limits:app"
LIMITED_RUNS = 30
RATE = 10
BUDGETED_RUNS = 12
PRICE = 0.01
BUDGET = 0.05


class Slow(base.Provider):
    """A model that takes 0.2 s per answer, so every worker has calls in flight at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        await asyncio.sleep(0.2)
        return base.ProviderResult(
            model=request.model, version="1", label="billing", confidence=0.9, tokens_in=5
        )


CONFIG: dict[str, Any] = {
    "providers": {"fast_api": {"type": "python", "retries": 0}, "paid_api": {"type": "python"}},
    "models": {
        "limited": {"provider": "fast_api", "model": "limited-1"},
        "paid": {"provider": "paid_api", "model": "paid-1"},
    },
    "tasks": {
        "ticket": {
            "capability": "classify",
            "labels": ["billing", "other"],
            "chain": ["limited"],
            "cache_ttl_s": 0,
        },
        "costly": {
            "capability": "classify",
            "labels": ["billing", "other"],
            "chain": ["paid"],
            "cache_ttl_s": 0,
        },
    },
    "prices": {"paid": {"per_call": PRICE}},
    "limits": [{"scope": "model", "name": "limited", "calls": RATE, "per_s": 3600}],
    "budgets": [{"scope": "task", "name": "costly", "limit_usd": BUDGET, "window": "day"}],
}


def build(database_url: str | None = None) -> flowdesk.App:
    the_app = flowdesk.App(database_url)
    rollout.wire(
        the_app, CONFIG, providers={"fast_api": Slow("fast_api"), "paid_api": Slow("paid_api")}
    )

    async def ask(ctx: flowdesk.Context, task: str, n: int) -> dict[str, Any]:
        try:
            answer = await ctx.model(task, f"billing question {n}")
        except flowdesk.StepFailed as exc:
            return {"pid": os.getpid(), "answered": False, "error": exc.error_type}
        return {"pid": os.getpid(), "answered": True, "cost": answer.cost_usd}

    @the_app.workflow("limited")
    async def limited(ctx: flowdesk.Context, n: int) -> dict[str, Any]:
        return await ask(ctx, "ticket", n)

    @the_app.workflow("budgeted")
    async def budgeted(ctx: flowdesk.Context, n: int) -> dict[str, Any]:
        return await ask(ctx, "costly", n)

    return the_app


app = build()


def _start(database_url: str) -> list[str]:
    async def go() -> list[str]:
        client = build(database_url)
        ids = []
        async with client:
            for n in range(max(LIMITED_RUNS, BUDGETED_RUNS)):
                if n < LIMITED_RUNS:
                    ids.append((await client.start("limited", {"n": n})).id)
                if n < BUDGETED_RUNS:
                    ids.append((await client.start("budgeted", {"n": n})).id)
        return ids

    return asyncio.run(go())


def _outputs(flow: Flow, workflow: str) -> list[dict[str, Any]]:
    rows = flow.rows("SELECT id, status, output FROM runs WHERE workflow = ?", (workflow,))
    assert all(status == "succeeded" for _, status, _ in rows), rows
    return [flow.payload(run_id, 0, "output", output) for run_id, _, output in rows]


def _scenario(flow: Flow, workers: list[Proc]) -> None:
    pids = {w.pid for w in workers}
    ids = _start(flow.url)
    assert len(ids) == LIMITED_RUNS + BUDGETED_RUNS
    flow.wait_until(
        lambda: flow.status_counts() == {"succeeded": LIMITED_RUNS + BUDGETED_RUNS},
        timeout=60,
        what="every run to finish",
        watch=workers,
    )

    limited = _outputs(flow, "limited")
    answered = [o for o in limited if o["answered"]]
    refused = [o for o in limited if not o["answered"]]
    assert len(answered) == RATE, Counter(o["pid"] for o in answered)
    assert {o["error"] for o in refused} == {"BudgetExceeded"}
    assert len(refused) == LIMITED_RUNS - RATE
    assert {o["pid"] for o in limited} <= pids
    assert len({o["pid"] for o in answered}) >= 2, "the answers came from one process only"
    assert flow.rows("SELECT COUNT(*) FROM model_rate_events") == [(RATE,)]

    budgeted = _outputs(flow, "budgeted")
    paid = [o for o in budgeted if o["answered"]]
    assert len(paid) == round(BUDGET / PRICE)
    assert all(o["cost"] == PRICE for o in paid)
    assert {o["error"] for o in budgeted if not o["answered"]} == {"BudgetExceeded"}
    assert len({o["pid"] for o in budgeted}) >= 2
    assert flow.rows("SELECT scope, spent_nusd, calls FROM model_budget_usage") == [
        ("task:costly", round(BUDGET * 1e9), round(BUDGET / PRICE))
    ]

    # Cost per workflow, from the CLI: only the calls that went out are in the ledger.
    usage = flow.cli_json("models", "usage", "--by", "workflow,model", "--database-url", flow.url)
    rows = {r["workflow"]: r for r in usage["rows"]}
    assert (rows["budgeted"]["calls"], rows["limited"]["calls"]) == (5, RATE)
    assert abs(rows["budgeted"]["cost_usd"] - BUDGET) < 1e-9
    assert rows["limited"]["cost_usd"] == 0.0

    for w in workers:
        assert flow.stop(w) == 0, w.describe()
        assert "Traceback" not in w.output(), w.output()[-3000:]


def _env(flow: Flow) -> None:
    """The workers import this module as ``acceptance.test_shared_limits``."""
    flow.env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), flow.env["PYTHONPATH"]])


def test_a_shared_rate_limit_and_budget_hold_across_three_workers_on_sqlite(flow: Flow) -> None:
    _env(flow)
    flow.init_db()
    workers = [
        flow.spawn(
            "worker",
            "--app",
            APP,
            "--concurrency",
            "4",
            "--poll-interval",
            "0.05",
            name=f"worker-{n}",
        )
        for n in range(3)
    ]
    for w in workers:
        flow.wait_ready(w)
    _scenario(flow, workers)


def test_a_shared_rate_limit_and_budget_hold_across_three_workers_on_postgres(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    _env(flow)
    workers = [
        flow.worker(app=APP, concurrency=4, poll=0.05, name=f"worker-{n}", ready=False)
        for n in range(3)
    ]
    for w in workers:
        flow.wait_ready(w)
    _scenario(flow, workers)
