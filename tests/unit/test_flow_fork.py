"""Fork: a new run that keeps the recorded results before a step and executes from it."""

from __future__ import annotations

from collections import Counter

import pytest

import flowdesk
from flowdesk import RunStatus


def _register(app: flowdesk.App, calls: Counter[str], flags: dict[str, str]) -> None:
    @app.step(name="fetch")
    async def fetch(n: int) -> int:
        calls["fetch"] += 1
        return n * 10

    @app.step(name="enrich")
    async def enrich(v: int) -> int:
        calls["enrich"] += 1
        return v + 1

    @app.step(name="publish")
    async def publish(v: int, child: str) -> str:
        calls["publish"] += 1
        return f"{flags['mode']}:{v}:{child}"

    @app.step(name="score")
    async def score(v: int) -> str:
        calls["score"] += 1
        return f"score-{v}"

    @app.workflow("scorer")
    async def scorer(ctx: flowdesk.Context, v: int) -> str:
        return await ctx.step(score, v)

    # seq 1 fetch, 2 enrich, 3 child scorer, 4 publish
    @app.workflow("pipeline")
    async def pipeline(ctx: flowdesk.Context, n: int) -> str:
        v = await ctx.step(fetch, n)
        v = await ctx.step(enrich, v)
        child = await ctx.child(scorer, {"v": v})
        return await ctx.step(publish, v, child)


def _child_runs(query, parent_id: str) -> list[tuple[str, str]]:
    return query("SELECT id, status FROM runs WHERE parent_id = ?", (parent_id,))


async def test_fork_keeps_results_before_the_step_and_executes_from_it(app, query):
    calls: Counter[str] = Counter()
    flags = {"mode": "v1"}
    _register(app, calls, flags)

    async with app, app.worker(concurrency=10):
        original = await app.start("pipeline", {"n": 4})
        assert await original.result(timeout=10) == "v1:41:score-41"
        assert calls == {"fetch": 1, "enrich": 1, "score": 1, "publish": 1}

        flags["mode"] = "v2"  # the behaviour of step 4 changes between the two runs
        forked = await app.fork(original.id, 4)
        assert forked.id != original.id and forked.created
        assert forked.workflow == "pipeline"
        assert await forked.result(timeout=10) == "v2:41:score-41"

        run = await app.get_run(forked.id)
        assert run.forked_from == original.id
        assert run.forked_seq == 4
        assert run.input == {"n": 4}
        assert run.status is RunStatus.SUCCEEDED
        steps = await app.steps(forked.id)
        original_steps = await app.steps(original.id)
        # Steps 1-3 are the original's records, copied as they were.
        assert [(s.seq, s.name, s.output) for s in steps[:3]] == [
            (s.seq, s.name, s.output) for s in original_steps[:3]
        ]
        assert [s.started_at for s in steps[:3]] == [s.started_at for s in original_steps[:3]]
        assert steps[3].output == "v2:41:score-41"
        # The original is untouched.
        assert (await app.get_run(original.id)).output == "v1:41:score-41"
        assert (await app.get_run(original.id)).forked_from is None

    # Nothing before step 4 executed again: not the steps, not the child workflow.
    assert calls == {"fetch": 1, "enrich": 1, "score": 1, "publish": 2}
    assert _child_runs(query, forked.id) == []
    assert len(_child_runs(query, original.id)) == 1
    assert query("SELECT COUNT(*) FROM runs WHERE workflow = 'scorer'") == [(1,)]


async def test_fork_from_the_child_runs_it_again(app, query):
    calls: Counter[str] = Counter()
    flags = {"mode": "v1"}
    _register(app, calls, flags)

    async with app, app.worker(concurrency=10):
        original = await app.start("pipeline", {"n": 2})
        assert await original.result(timeout=10) == "v1:21:score-21"
        forked = await app.fork(original.id, 3)
        assert await forked.result(timeout=10) == "v1:21:score-21"
        assert (await app.get_run(forked.id)).forked_seq == 3

    assert calls == {"fetch": 1, "enrich": 1, "score": 2, "publish": 2}
    assert _child_runs(query, forked.id) == [(f"{forked.id}-3", "succeeded")]
    assert query("SELECT COUNT(*) FROM runs WHERE workflow = 'scorer'") == [(2,)]


async def test_fork_from_step_one_executes_everything(app):
    calls: Counter[str] = Counter()
    _register(app, calls, {"mode": "m"})
    async with app, app.worker(concurrency=10):
        original = await app.start("pipeline", {"n": 1})
        await original.result(timeout=10)
        forked = await app.fork(original.id, 1)
        assert await forked.result(timeout=10) == "m:11:score-11"
        assert await app.steps(forked.id) != [] and (await app.get_run(forked.id)).forked_seq == 1
    assert calls == {"fetch": 2, "enrich": 2, "score": 2, "publish": 2}


async def test_fork_past_a_pending_wait_forks_from_the_wait(app, wait_status):
    calls: Counter[str] = Counter()

    @app.step(name="prepare")
    async def prepare() -> str:
        calls["prepare"] += 1
        return "prepared"

    @app.step(name="finish")
    async def finish(approval: str) -> str:
        calls["finish"] += 1
        return f"done:{approval}"

    # seq 1 prepare, 2 wait for "approve", 3 finish
    @app.workflow("approval")
    async def approval(ctx: flowdesk.Context) -> str:
        await ctx.step(prepare)
        answer = await ctx.wait_signal("approve")
        return await ctx.step(finish, answer)

    async with app, app.worker(concurrency=10):
        original = await app.start("approval")
        await wait_status(app, original.id, RunStatus.WAITING)
        forked = await app.fork(original.id, 3)
        run = await app.get_run(forked.id)
        assert run.forked_from == original.id
        assert run.forked_seq == 2  # not 3: the wait at 2 was not over
        await wait_status(app, forked.id, RunStatus.WAITING)
        steps = await app.steps(forked.id)
        assert [(s.seq, s.name, s.status) for s in steps] == [
            (1, "prepare", "ok"),
            (2, "signal:approve", "pending"),
        ]
        # Each run waits for its own signal.
        await app.signal(forked.id, "approve", "fork-yes")
        assert await forked.result(timeout=10) == "done:fork-yes"
        assert (await app.get_run(original.id)).status is RunStatus.WAITING
        await app.signal(original.id, "approve", "orig-yes")
        assert await original.result(timeout=10) == "done:orig-yes"
    assert calls == {"prepare": 1, "finish": 2}


async def test_fork_errors(app):
    @app.workflow("noop")
    async def noop(ctx: flowdesk.Context) -> int:
        return 1

    async with app, app.worker():
        with pytest.raises(flowdesk.RunNotFound):
            await app.fork("no-such-run", 2)
        h = await app.start("noop")
        await h.result(timeout=5)
        with pytest.raises(flowdesk.FlowdeskError, match="numbered from 1"):
            await app.fork(h.id, 0)
        with pytest.raises(flowdesk.FlowdeskError, match="numbered from 1"):
            await app.fork(h.id, -3)
        # A refused fork leaves nothing behind.
        assert [r.id for r in (await app.list_runs()).items] == [h.id]
