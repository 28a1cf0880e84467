"""Cost accounting and budgets (flowdesk.models.ledger, flowdesk.models.budgets), on both
stores: a price table per model (per 1k tokens, per call), cost per call, per run and per
workflow in the ``model_ledger`` table and in the metrics, budgets per task, per workflow
and per window enforced before the call (refused, or down the chain to a cheaper model),
and shared rate limits that hold across App objects on one database.

Models are in-process `Provider` subclasses (real code, no network); the gateway, the
interceptors, the worker and the store are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

import flowdesk
from flowdesk import errors, observe
from flowdesk.models import base, budgets, ledger, rollout
from flowdesk.models import config as cfg
from flowdesk.store import sql_models

LABELS = ["billing", "technical", "other"]


class Counting(base.Provider):
    """Classifies by the first label named in the text; reports ``tokens_in`` (one per 4
    characters) and 2 output tokens; counts its calls. ``fail`` makes it unavailable."""

    def __init__(self, name: str, *, confidence: float = 0.9) -> None:
        self.name = name
        self.confidence = confidence
        self.calls: list[base.ModelRequest] = []
        self.fail = False

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        self.calls.append(request)
        if self.fail:
            raise errors.ProviderUnavailable(f"{self.name} is down")
        text = request.text.casefold()
        label = next((lab for lab in request.labels if lab in text), request.labels[-1])
        return base.ProviderResult(
            model=request.model,
            version=request.version or "1",
            label=label,
            confidence=self.confidence,
            tokens_in=len(request.text) // 4,
            tokens_out=2,
        )


def setup(**extra: Any) -> dict[str, Any]:
    """A config with an expensive model ``big`` (priced per 1k tokens) and a cheap local
    one ``small`` (priced per call), and tasks ``ticket`` (chain big, small) and ``route``
    (chain small)."""
    data: dict[str, Any] = {
        "providers": {
            "big_p": {"type": "python", "retries": 0},
            "small_p": {"type": "python", "retries": 0},
        },
        "models": {
            "big": {"provider": "big_p", "model": "big-1", "version": "2024"},
            "small": {"provider": "small_p", "model": "small-1", "version": "3"},
        },
        "tasks": {
            "ticket": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["big", "small"],
                "cache_ttl_s": 0,
                "max_tokens": 10,
            },
            "route": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["small"],
                "cache_ttl_s": 0,
            },
        },
        "prices": {
            "big": {"per_1k_in": 2.0, "per_1k_out": 10.0},
            "small": {"per_call": 0.0005},
        },
    }
    data.update(extra)
    return data


def wire(app: flowdesk.App, data: dict[str, Any], **kw: Any) -> tuple[rollout.Stack, Any]:
    big, small = Counting("big_p"), Counting("small_p")
    stack = rollout.wire(app, data, providers={"big_p": big, "small_p": small}, **kw)
    return stack, (big, small)


def big_cost(text: str) -> float:
    return (len(text) // 4) * 2.0 / 1000 + 2 * 10.0 / 1000


# -- 1. cost per call, per run, per workflow ---------------------------------------------------


async def test_each_call_is_priced_and_recorded_with_its_run_step_and_workflow(
    app, query, wait_status
):
    stack, (big, small) = wire(app, setup())

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        first = await ctx.model("ticket", text)
        second = await ctx.model("route", text)
        return {"first": first.cost_usd, "second": second.cost_usd}

    @app.workflow("other")
    async def other(ctx: flowdesk.Context, text: str) -> float:
        return float((await ctx.model("route", text)).cost_usd)

    text = "My invoice shows a billing error for March."  # 43 chars: 10 tokens in
    async with app, app.worker():
        one = await app.start("triage", {"text": text})
        two = await app.start("triage", {"text": text + " Again."})
        three = await app.start("other", {"text": "technical"})
        results = [await h.result(timeout=30) for h in (one, two, three)]
        await stack.flush()
        rows = await ledger.calls(app, one.id)
        by_run = await ledger.usage(app, by=("run_id",))
        by_workflow = await ledger.usage(app, by=("workflow",))
        by_model = await ledger.usage(app, by=("workflow", "task", "model"))
        triage_cost = await ledger.cost(app, workflow="triage")
        run_cost = await ledger.cost(app, run_id=one.id)
        total = await ledger.cost(app)
    await stack.close()

    # The answer carries the priced cost: per 1k tokens for big, per call for small.
    assert results[0] == {"first": pytest.approx(big_cost(text)), "second": 0.0005}
    assert results[2] == 0.0005
    # One ledger row per provider call, with the step's run, seq and workflow.
    assert [(r.seq, r.task, r.model, r.provider, r.version, r.role, r.status) for r in rows] == [
        (1, "ticket", "big", "big_p", "2024", "current", "ok"),
        (2, "route", "small", "small_p", "3", "current", "ok"),
    ]
    assert all(r.run_id == one.id and r.workflow == "triage" for r in rows)
    assert (rows[0].tokens_in, rows[0].tokens_out) == (len(text) // 4, 2)
    assert rows[0].cost_usd == pytest.approx(big_cost(text))
    assert rows[0].confidence == 0.9 and rows[0].latency_ms >= 0
    # Per run, per workflow, per model: the sums agree with the calls.
    run_sums = {r.key["run_id"]: r for r in by_run}
    assert run_sums[one.id].calls == 2
    assert run_sums[one.id].cost_usd == pytest.approx(big_cost(text) + 0.0005)
    assert run_cost == pytest.approx(big_cost(text) + 0.0005)
    expected_triage = big_cost(text) + big_cost(text + " Again.") + 2 * 0.0005
    assert triage_cost == pytest.approx(expected_triage)
    assert {r.key["workflow"]: r.calls for r in by_workflow} == {"other": 1, "triage": 4}
    assert total == pytest.approx(expected_triage + 0.0005)
    assert {(r.key["workflow"], r.key["model"]): r.calls for r in by_model} == {
        ("other", "small"): 1,
        ("triage", "big"): 2,
        ("triage", "small"): 2,
    }
    # The table itself is what the brief names: run, seq, workflow, task, model, version,
    # tokens, cost, latency, at.
    [row] = query(
        "SELECT run_id, seq, workflow, task, model, version, tokens_in, tokens_out, cost_usd,"
        " latency_ms, at FROM model_ledger WHERE run_id = ? AND seq = 1",
        (one.id,),
    )
    assert row[:8] == (one.id, 1, "triage", "ticket", "big", "2024", len(text) // 4, 2)
    assert len(big.calls) == 2 and len(small.calls) == 3


async def test_failed_calls_are_recorded_and_the_fallback_is_priced(app):
    stack, (big, small) = wire(app, setup())
    big.fail = True
    async with app:
        answer = await stack.gateway.ask("ticket", "billing please")
        await stack.flush()
        rows = await sql_models.models_store(app.store).model_calls(task="ticket")
    await stack.close()
    assert (answer.model, answer.fallback, answer.cost_usd) == ("small-1", True, 0.0005)
    assert [(r.model, r.status, r.error, r.cost_usd) for r in rows] == [
        ("big", "error", "ProviderUnavailable", 0.0),
        ("small", "ok", None, 0.0005),
    ]


async def test_a_model_without_a_price_entry_keeps_its_config_price(app):
    data = setup(prices={})
    data["models"]["big"].update(price_in_per_mtok=1000.0, price_out_per_mtok=5000.0)
    stack, _ = wire(app, data)
    async with app:
        answer = await stack.gateway.ask("ticket", "x" * 400)  # 100 tokens in, 2 out
    await stack.close()
    assert answer.cost_usd == pytest.approx((100 * 1000.0 + 2 * 5000.0) / 1e6)


async def test_calls_are_exported_to_the_metrics_of_the_app(app):
    stack, _ = wire(app, setup())

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> str | None:
        return (await ctx.model("ticket", text)).label

    metrics = observe.metrics_of(app)
    async with app, app.worker():
        handle = await app.start("triage", {"text": "billing question"})
        assert await handle.result(timeout=30) == "billing"
        text = (await metrics.render()).decode()
    await stack.close()
    cost = big_cost("billing question")
    line = 'flowdesk_model_cost_usd_total{model="big",task="ticket"}'
    [value] = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
    assert value == pytest.approx(cost)
    assert 'flowdesk_model_call_duration_seconds_count{model="big",task="ticket"} 1.0' in text
    per_workflow = 'flowdesk_workflow_model_cost_usd_total{workflow="triage"}'
    [value] = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(per_workflow)]
    assert value == pytest.approx(cost)


# -- 2. budgets, before the call --------------------------------------------------------------


async def test_a_task_budget_refuses_the_call_before_it_reaches_the_model(app, wait_status):
    data = setup(budgets=[{"scope": "task", "name": "route", "limit_usd": 0.0015}])
    stack, (_, small) = wire(app, data)

    @app.workflow("classify")
    async def classify(ctx: flowdesk.Context, text: str) -> str | None:
        return (await ctx.model("route", text)).label

    async with app, app.worker():
        done = [
            await (await app.start("classify", {"text": f"billing {i}"})).result(30)
            for i in range(3)
        ]
        refused = await app.start("classify", {"text": "billing 4"})
        run = await wait_status(app, refused.id, flowdesk.RunStatus.FAILED)
        [step] = await app.steps(refused.id)
        status = await stack.budgets.status()
    await stack.close()
    assert done == ["billing"] * 3
    assert len(small.calls) == 3  # the fourth never reached the model
    assert step.error is not None and step.error["type"] == "BudgetExceeded"
    assert "task:route" in step.error["message"] and "0.0015 USD" in step.error["message"]
    assert run.error is not None and run.error["type"] == "StepFailed"
    [route] = status
    assert (route.key, route.window, route.limit_usd) == ("task:route", "day", 0.0015)
    assert route.spent_usd == pytest.approx(0.0015) and route.left_usd == pytest.approx(0)


async def test_on_exceed_fallback_falls_to_a_cheaper_model_of_the_chain(app):
    # big's estimate for this text is 0.22 USD (60 tokens in with the prompt allowance, 10
    # out), its real cost 0.04: the budget lets one big call through, then small answers.
    budget = {"scope": "task", "name": "ticket", "limit_usd": 0.25, "on_exceed": "fallback"}
    stack, (big, small) = wire(app, setup(budgets=[budget]))
    text = "billing " * 5  # 40 chars: 10 tokens in, so big costs 0.02 + 0.02 = 0.04
    async with app:
        first = await stack.gateway.ask("ticket", text)
        second = await stack.gateway.ask("ticket", text)
        third = await stack.gateway.ask("ticket", text)
    await stack.close()
    assert (first.model, first.fallback) == ("big-1", False)
    # 0.04 spent + an estimate of 0.22 no longer fits: the cheaper model answers.
    assert (second.model, second.fallback, second.cost_usd) == ("small-1", True, 0.0005)
    assert (third.model, third.fallback) == ("small-1", True)
    assert len(big.calls) == 1 and len(small.calls) == 2


async def test_on_exceed_refuse_fails_the_call_without_trying_the_rest_of_the_chain(app):
    budget = {"scope": "task", "name": "ticket", "limit_usd": 0.001}
    stack, (big, small) = wire(app, setup(budgets=[budget]))
    async with app:
        with pytest.raises(errors.BudgetExceeded) as info:
            await stack.gateway.ask("ticket", "billing")
        # A new call starts from the top of the chain again (and is refused again).
        with pytest.raises(errors.BudgetExceeded):
            await stack.gateway.ask("ticket", "billing")
        # Another task is not refused by this budget.
        assert (await stack.gateway.ask("route", "billing")).model == "small-1"
    await stack.close()
    assert "task:ticket" in str(info.value) and "on_exceed = 'refuse'" in str(info.value)
    assert big.calls == [] and len(small.calls) == 1


async def test_refuse_holds_within_one_workflow_step_and_not_beyond_it(app, wait_status):
    budget = {"scope": "workflow", "name": "pricey", "limit_usd": 0.0001}
    stack, (big, small) = wire(app, setup(budgets=[budget]))

    @app.workflow("pricey")
    async def pricey(ctx: flowdesk.Context) -> list[str]:
        out = []
        for _ in range(2):
            try:
                out.append(str((await ctx.model("ticket", "billing")).model))
            except flowdesk.StepFailed as exc:
                out.append(exc.error_type)
        return out

    @app.workflow("cheap")
    async def cheap(ctx: flowdesk.Context) -> str:
        return str((await ctx.model("ticket", "billing")).model)

    async with app, app.worker():
        assert await (await app.start("pricey")).result(30) == ["BudgetExceeded"] * 2
        assert await (await app.start("cheap")).result(30) == "big-1"  # not its budget
    await stack.close()
    assert len(big.calls) == 1 and small.calls == []


async def test_the_reservation_settles_to_the_real_cost_and_a_failed_call_gives_it_back(app, query):
    budget = {"scope": "all", "limit_usd": 1.0, "window": "total"}
    stack, (big, _) = wire(app, setup(budgets=[budget]))
    async with app:
        answer = await stack.gateway.ask("ticket", "billing")
        await stack.flush()
        [(spent, calls)] = query(
            "SELECT spent_nusd, calls FROM model_budget_usage WHERE scope = 'all'"
        )
        assert (spent, calls) == (round(answer.cost_usd * ledger.NANO), 1)
        big.fail = True
        fallback = await stack.gateway.ask("ticket", "billing")  # big fails, small answers
        await stack.flush()
        [(spent_after, calls_after)] = query(
            "SELECT spent_nusd, calls FROM model_budget_usage WHERE scope = 'all'"
        )
    await stack.close()
    assert fallback.model == "small-1"
    # big's reservation came back; small's per-call price was added.
    assert spent_after == spent + round(0.0005 * ledger.NANO)
    assert calls_after == 3


async def test_budget_windows_start_again_each_day(app):
    now = {"t": 1_700_000_000.0}  # 2023-11-14 22:13 UTC
    big, small = Counting("big_p"), Counting("small_p")
    config, settings = rollout.parse(
        setup(budgets=[{"scope": "model", "name": "small", "limit_usd": 0.001}])
    )
    prices = ledger.Prices(settings.prices)
    guard = budgets.Budgets(app, settings.budgets, prices=prices, clock=lambda: now["t"])
    from flowdesk.models.gateway import Gateway

    gw = Gateway(
        config,
        providers={"big_p": big, "small_p": small},
        interceptors=[guard, ledger.Ledger(app, prices)],
    )
    async with app:
        for _ in range(2):
            await gw.ask("route", "billing")
        with pytest.raises(errors.BudgetExceeded):
            await gw.ask("route", "billing")
        now["t"] += 2 * 3600  # past midnight UTC: a new window
        await gw.ask("route", "billing")
        await guard.settlements.flush()
        rows = await sql_models.models_store(app.store).budget_usage()
    await gw.close()
    assert budgets.window_start("day", 1_700_000_000_000) == 1_699_920_000_000
    assert [(r.scope, r.window_start, r.calls) for r in rows] == [
        ("model:small", 1_699_920_000_000, 2),
        ("model:small", 1_700_006_400_000, 1),
    ]
    assert len(small.calls) == 3


def test_budget_and_limit_config_mistakes_are_clear_errors():
    with pytest.raises(errors.ConfigurationError, match="names task 'nope'"):
        rollout.parse(setup(budgets=[{"scope": "task", "name": "nope", "limit_usd": 1}]))
    with pytest.raises(errors.ConfigurationError, match="needs a name"):
        rollout.parse(setup(budgets=[{"scope": "task", "limit_usd": 1}]))
    with pytest.raises(errors.ConfigurationError, match=r"\[prices.nope\]"):
        rollout.parse(setup(prices={"nope": {"per_call": 1}}))
    with pytest.raises(errors.ConfigurationError, match="limits\\[0\\] names provider"):
        rollout.parse(setup(limits=[{"scope": "provider", "name": "x", "calls": 1, "per_s": 1}]))
    with pytest.raises(errors.ConfigurationError, match="prices.big.per_cal: Extra inputs"):
        rollout.parse(setup(prices={"big": {"per_cal": 1}}))
    # The core config still refuses what it does not know.
    with pytest.raises(errors.ConfigurationError):
        cfg.GatewayConfig.parse(setup())


# -- 3. shared rate limits ----------------------------------------------------------------------


async def test_a_rate_limit_holds_across_apps_sharing_the_database(make_app):
    limit = {"scope": "model", "name": "small", "calls": 5, "per_s": 60}
    apps = [make_app() for _ in range(3)]
    stacks = [wire(a, setup(limits=[limit]))[0] for a in apps]

    async def ask(stack: rollout.Stack, i: int) -> str:
        try:
            return str((await stack.gateway.ask("route", f"billing {i}")).model)
        except errors.BudgetExceeded as exc:
            assert "Rate limit 'model:small'" in str(exc) and "5 calls per 60 s" in str(exc)
            return "refused"

    for a in apps:
        await a.open()
    outcomes = await asyncio.gather(*(ask(stacks[i % 3], i) for i in range(12)))
    for a, s in zip(apps, stacks, strict=True):
        await s.close()
        await a.close()
    assert sorted(outcomes) == ["refused"] * 7 + ["small-1"] * 5


async def test_a_rate_limit_with_wait_s_defers_the_call_until_a_slot_frees(app, query):
    limit = {"scope": "task", "name": "route", "calls": 2, "per_s": 0.3, "wait_s": 5}
    stack, (_, small) = wire(app, setup(limits=[limit]))
    async with app:
        answers = [await stack.gateway.ask("route", f"billing {i}") for i in range(4)]
        events = query("SELECT at FROM model_rate_events ORDER BY at")
    await stack.close()
    assert [a.model for a in answers] == ["small-1"] * 4 and len(small.calls) == 4
    # No window of 300 ms ever held more than 2 calls.
    stamps = [int(r[0]) for r in events]
    assert all(b - a >= 300 for a, b in zip(stamps, stamps[2:], strict=False))


# -- 4. the CLI ------------------------------------------------------------------------------


async def test_flowdesk_models_usage_prints_a_runs_calls_and_a_workflows_cost(
    app, db_url, tmp_path
):
    stack, _ = wire(app, setup())

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> str | None:
        await ctx.model("ticket", text)
        return (await ctx.model("route", text)).label

    async with app, app.worker():
        handle = await app.start("triage", {"text": "billing"})
        await handle.result(timeout=30)
        await stack.flush()
    await stack.close()

    def cli(*args: str) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
        done = subprocess.run(
            [sys.executable, "-m", "flowdesk", "models", *args, "--database-url", db_url, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    run = await asyncio.to_thread(cli, "usage", "--run", handle.id)
    assert [(c["seq"], c["model"], c["role"]) for c in run["calls"]] == [
        (1, "big", "current"),
        (2, "small", "current"),
    ]
    assert run["total"]["calls"] == 2
    assert run["total"]["cost_usd"] == pytest.approx(big_cost("billing") + 0.0005)
    flow = await asyncio.to_thread(cli, "usage", "--workflow", "triage", "--by", "workflow")
    assert flow["rows"] == [
        {
            "workflow": "triage",
            "calls": 2,
            "errors": 0,
            "tokens_in": 2,  # "billing" is one token to each model
            "tokens_out": 4,
            "cost_usd": pytest.approx(big_cost("billing") + 0.0005),
            "latency_ms_avg": pytest.approx(flow["rows"][0]["latency_ms_avg"]),
            "latency_ms_max": pytest.approx(flow["rows"][0]["latency_ms_max"]),
        }
    ]


# -- 5. the hot path ------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_the_ledger_row_commits_in_the_same_transaction_as_the_steps_record(app, monkeypatch):
    """The ledger queues its row on the engine's group-commit writer (`Writer.enqueue`)
    and the gateway returns without suspending, so each model step's ledger row commits
    in the very transaction that records the step: the ledger costs a workflow no commit."""
    from flowdesk.store import sql, sqlite

    current = {"n": 0}
    log: list[tuple[int, str, Any]] = []
    apply, record = sqlite.SQLiteStore._apply, sql.SqlTx.record
    record_calls = sql_models.ModelsTx.record_model_calls

    def numbered(self: Any, conn: Any, work: Any) -> Any:
        current["n"] += 1  # SQLite applies a transaction in one go: nothing interleaves
        return apply(self, conn, work)

    async def step_record(self: Any, run_id: str, owner: str, rows: Any, versions: Any) -> None:
        log.extend((current["n"], "step", (run_id, r.seq)) for r in rows)
        await record(self, run_id, owner, rows, versions)

    async def ledger_rows(self: Any, rows: Any) -> None:
        log.extend((current["n"], "ledger", (r.run_id, r.seq)) for r in rows)
        await record_calls(self, rows)

    monkeypatch.setattr(sqlite.SQLiteStore, "_apply", numbered)
    monkeypatch.setattr(sql.SqlTx, "record", step_record)
    monkeypatch.setattr(sql_models.ModelsTx, "record_model_calls", ledger_rows)
    stack, _ = wire(app, setup(drift={"tasks": []}))  # the ledger alone: no drift samples

    @app.workflow("many")
    async def many(ctx: flowdesk.Context) -> int:
        for i in range(10):
            await ctx.model("route", f"billing {i}")
        return 10

    async with app, app.worker():
        handle = await app.start("many")
        assert await handle.result(timeout=30) == 10
        await stack.flush()
    await stack.close()
    ledger_at = {key: n for n, kind, key in log if kind == "ledger"}
    steps_at = {key: n for n, kind, key in log if kind == "step"}
    assert sorted(ledger_at) == [(handle.id, seq) for seq in range(1, 11)]
    apart = {k[1]: (n, steps_at[k]) for k, n in ledger_at.items() if n != steps_at[k]}
    assert not apart, f"seq: (ledger's transaction, step's transaction): {apart}"
