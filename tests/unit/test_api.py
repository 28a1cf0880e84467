"""The client API: listing and paging runs, lookups, idempotent starts, public names."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest

import flowdesk
from flowdesk import RunStatus


def _register(app: flowdesk.App) -> None:
    @app.workflow("alpha")
    async def alpha(ctx: flowdesk.Context, n: int) -> Any:
        return await ctx.wait_signal("go")

    @app.workflow("beta")
    async def beta(ctx: flowdesk.Context, n: int) -> int:
        return n


async def _all_pages(app: flowdesk.App, limit: int, **filters: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await app.list_runs(limit=limit, cursor=cursor, **filters)
        pages.append([r.id for r in page.items])
        cursor = page.next_cursor
        if cursor is None:
            return pages


async def test_list_runs_filters_and_pages_without_duplicates_or_gaps(app, wait_until):
    _register(app)
    async with app, app.worker(concurrency=50):
        alphas = [
            h.id for h in await asyncio.gather(*(app.start("alpha", {"n": i}) for i in range(23)))
        ]
        betas = [
            h.id for h in await asyncio.gather(*(app.start("beta", {"n": i}) for i in range(12)))
        ]

        async def settled() -> bool:
            return (
                await app.store.count_runs("waiting") == 23
                and await app.store.count_runs("succeeded") == 12
            )

        await wait_until(settled)
        for run_id in alphas[:5]:
            await app.cancel(run_id)

        everything = await _all_pages(app, limit=4)
        flat = [i for page in everything for i in page]
        assert len(everything) == 9 and all(len(p) == 4 for p in everything[:-1])
        assert len(flat) == len(set(flat)) == 35
        assert set(flat) == set(alphas) | set(betas)

        # Newest first, ties on the millisecond broken by id: the order is total.
        runs = [await app.get_run(i) for i in flat]
        keys = [(r.created_at, r.id) for r in runs]
        assert keys == sorted(keys, reverse=True)

        waiting = [i for p in await _all_pages(app, limit=5, status="waiting") for i in p]
        assert sorted(waiting) == sorted(alphas[5:])
        cancelled = await app.list_runs(status=RunStatus.CANCELLED)
        assert sorted(r.id for r in cancelled.items) == sorted(alphas[:5])
        assert cancelled.next_cursor is None
        only_beta = [i for p in await _all_pages(app, limit=5, workflow="beta") for i in p]
        assert sorted(only_beta) == sorted(betas)
        both = await app.list_runs(status="succeeded", workflow="beta", limit=100)
        assert sorted(r.id for r in both.items) == sorted(betas)
        assert all(r.output == r.input["n"] for r in both.items)
        none = await app.list_runs(status="succeeded", workflow="alpha")
        assert none.items == [] and none.next_cursor is None
        assert (await app.list_runs(workflow="gamma")).items == []

        # Runs started while paging are newer than the cursor: later pages are unaffected.
        first = await app.list_runs(limit=10)
        await asyncio.gather(*(app.start("beta", {"n": 100 + i}) for i in range(3)))
        rest = [i for p in await _all_pages_from(app, first.next_cursor, 10) for i in p]
        assert [r.id for r in first.items] + rest == flat

        for run_id in alphas[5:]:
            await app.cancel(run_id)


async def _all_pages_from(app: flowdesk.App, cursor: str | None, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    while cursor is not None:
        page = await app.list_runs(limit=limit, cursor=cursor)
        pages.append([r.id for r in page.items])
        cursor = page.next_cursor
    return pages


async def test_list_runs_refuses_an_unknown_status_and_a_bad_cursor(app):
    _register(app)
    async with app:
        with pytest.raises(flowdesk.FlowdeskError, match="Unknown status"):
            await app.list_runs(status="sleeping")
        with pytest.raises(flowdesk.FlowdeskError, match="Invalid cursor"):
            await app.list_runs(cursor="not-a-cursor")


async def test_lookups_of_an_unknown_run_raise_run_not_found(app):
    _register(app)
    async with app:
        for call in (
            app.get_run("nope"),
            app.steps("nope"),
            app.result("nope", timeout=1),
            app.wait("nope", timeout=1),
        ):
            with pytest.raises(flowdesk.RunNotFound) as info:
                await call
            assert info.value.run_id == "nope"
            assert "'nope'" in str(info.value)


async def test_run_record_and_handle(app):
    _register(app)
    async with app, app.worker(concurrency=2):
        h = await app.start(app.registry.workflows["beta"].fn, {"n": 7})
        assert h.workflow == "beta" and h.created
        assert await h.result(timeout=10) == 7
        assert await h.status() is RunStatus.SUCCEEDED
        run = await app.get_run(h.id)
    assert (run.id, run.workflow, run.queue, run.input, run.output) == (
        h.id,
        "beta",
        "default",
        {"n": 7},
        7,
    )
    assert run.error is None and run.parent_id is None and run.attempts == 1
    assert run.started_at is not None and run.finished_at is not None
    assert run.created_at <= run.started_at <= run.finished_at
    assert run.due_at is None and run.lease_owner is None


async def test_result_of_an_unfinished_run_times_out(app):
    _register(app)
    async with app:
        h = await app.start("alpha", {"n": 1})
        with pytest.raises(flowdesk.errors.ResultTimeout) as info:
            await app.result(h.id, timeout=0.1)
        assert isinstance(info.value, TimeoutError)
        assert "queued" in str(info.value)


class Receipt(pydantic.BaseModel):
    order_id: str
    total: float


async def test_result_decodes_the_workflows_return_type(app):
    @app.workflow("receipt")
    async def receipt(ctx: flowdesk.Context, order_id: str) -> Receipt:
        return Receipt(order_id=order_id, total=12.5)

    async with app, app.worker(concurrency=2):
        h = await app.start("receipt", {"order_id": "A"})
        value = await app.result(h.id, timeout=10)
        run = await app.get_run(h.id)
    assert value == Receipt(order_id="A", total=12.5)
    assert run.output == {"order_id": "A", "total": 12.5}


# -- idempotent start ------------------------------------------------------------------


async def test_the_same_idempotency_key_returns_the_same_run(app):
    _register(app)
    async with app, app.worker(concurrency=2):
        first = await app.start("beta", {"n": 1}, idempotency_key="order-1")
        again = await app.start("beta", {"n": 1}, idempotency_key="order-1")
        assert first.created and not again.created
        assert again.id == first.id
        assert await app.result(first.id, timeout=10) == 1
        # Still the same run once it has finished.
        later = await app.start("beta", {"n": 1}, idempotency_key="order-1")
        assert (later.id, later.created) == (first.id, False)
        # Concurrent starts with one key make one run.
        racers = await asyncio.gather(
            *(app.start("beta", {"n": 2}, idempotency_key="order-2") for _ in range(20))
        )
        assert len({r.id for r in racers}) == 1
        assert sum(r.created for r in racers) == 1
        assert await app.store.count_runs() == 2
        assert (await app.get_run(first.id)).idempotency_key == "order-1"


async def test_equal_input_written_differently_is_the_same_input(app):
    @app.workflow("orders")
    async def orders(ctx: flowdesk.Context, order_id: str, amount: float = 10.0) -> str:
        return order_id

    async with app:
        a = await app.start("orders", {"order_id": "A", "amount": 10}, idempotency_key="k")
        b = await app.start("orders", {"amount": 10.0, "order_id": "A"}, idempotency_key="k")
        c = await app.start("orders", {"order_id": "A"}, idempotency_key="k")
        assert a.id == b.id == c.id and not b.created and not c.created


async def test_a_reused_key_with_other_input_or_workflow_conflicts(app):
    _register(app)
    async with app:
        h = await app.start("beta", {"n": 1}, idempotency_key="order-1")
        with pytest.raises(flowdesk.IdempotencyConflict, match="different input") as info:
            await app.start("beta", {"n": 2}, idempotency_key="order-1")
        assert h.id in str(info.value)
        with pytest.raises(flowdesk.IdempotencyConflict, match="another workflow"):
            await app.start("alpha", {"n": 1}, idempotency_key="order-1")
        assert await app.store.count_runs() == 1
        # Without a key, every start is a new run.
        x = await app.start("beta", {"n": 1})
        y = await app.start("beta", {"n": 1})
        assert x.id != y.id and x.created and y.created


# -- public names ----------------------------------------------------------------------


def test_public_exports_are_pinned():
    assert flowdesk.__all__ == sorted(flowdesk.__all__)
    assert flowdesk.__all__ == [
        "App",
        "Assignees",
        "Child",
        "Context",
        "Escalation",
        "FirstOf",
        "FlowdeskError",
        "FourEyesViolation",
        "IdempotencyConflict",
        "InvalidForm",
        "InvalidInput",
        "InvalidState",
        "NonDeterminismError",
        "Permanent",
        "PermissionDenied",
        "QueueLimits",
        "Run",
        "RunCancelled",
        "RunFailed",
        "RunHandle",
        "RunNotFound",
        "RunStatus",
        "ScheduleRecord",
        "SerializationError",
        "Signal",
        "StepFailed",
        "StepInfo",
        "StepRecord",
        "StepTimeout",
        "TaskNotFound",
        "TaskRecord",
        "Timer",
        "UnknownWorkflow",
        "WaitTimeout",
        "__version__",
        "current_step",
    ]
    for name in flowdesk.__all__:
        assert getattr(flowdesk, name) is not None


def test_error_hierarchy():
    errors = flowdesk.errors
    for name in flowdesk.__all__:
        value = getattr(flowdesk, name)
        is_error = isinstance(value, type) and issubclass(value, Exception)
        if is_error and value is not flowdesk.Permanent:
            assert issubclass(value, flowdesk.FlowdeskError), name
    assert not issubclass(flowdesk.Permanent, flowdesk.FlowdeskError)
    assert issubclass(flowdesk.StepTimeout, TimeoutError)
    assert issubclass(flowdesk.WaitTimeout, TimeoutError)
    assert issubclass(errors.ResultTimeout, TimeoutError)
    assert issubclass(flowdesk.UnknownWorkflow, errors.NotFound)
    assert issubclass(flowdesk.RunNotFound, errors.NotFound)
    assert issubclass(errors.SchemaTooNew, errors.StoreError)
    # What the engine unwinds workflows with cannot be caught by ``except Exception``.
    assert not issubclass(errors.Suspended, Exception)
    assert not issubclass(errors.LeaseLost, Exception)


def test_errors_survive_pickling():
    import pickle

    samples = [
        flowdesk.UnknownWorkflow("x", ["a"]),
        flowdesk.RunNotFound("r"),
        flowdesk.InvalidInput("w", [{"loc": ("a",), "msg": "bad"}]),
        flowdesk.StepFailed("s", 3, "ValueError", "boom"),
        flowdesk.NonDeterminismError("r", 2, "a", "b"),
        flowdesk.RunFailed("r", {"type": "T", "message": "m"}),
        flowdesk.RunCancelled("r", "why"),
    ]
    for exc in samples:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc)
