"""Worker housekeeping: leases of runs a worker no longer executes are not kept alive."""

from __future__ import annotations

import flowdesk
from flowdesk import RunStatus


async def test_heartbeat_does_not_extend_a_run_the_worker_no_longer_executes(db_url, wait_until):
    app = flowdesk.App(db_url, lease_seconds=0.6, poll_interval=0.05)

    @app.workflow("hello")
    async def hello(ctx: flowdesk.Context) -> str:
        return "hi"

    async with app:
        handle = await app.start("hello")
        background = app.worker()
        worker = background.worker
        # The store says this worker holds the run, but no coroutine of it executes it
        # (as after a failed final write). Its heartbeats must let the lease run out.
        claimed = await app.store.claim(worker.id, ["default"], ["nothing-here"], 1, 600)
        assert claimed == []
        claimed = await app.store.claim(worker.id, ["default"], ["hello"], 1, 600)
        assert [c.id for c in claimed] == [handle.id]
        held, _ = await app.store.heartbeat(worker.id, [], 60_000, {})
        assert held == set()
        run = await app.get_run(handle.id)
        assert run.status is RunStatus.RUNNING

        # The same worker now runs and heartbeats every 0.2 s. Were the lease extended for
        # every run it owns in the store, the run would never become due again.
        async with background:
            result = await app.result(handle.id, timeout=10)
        assert result == "hi"
        run = await app.get_run(handle.id)
        assert run.attempts == 2  # claimed again once the unextended lease ran out
