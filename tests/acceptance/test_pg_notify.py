"""LISTEN/NOTIFY on PostgreSQL, with real processes: an idle worker that polls only every
10 s starts a run created by another process at once, because the commit that created it
sent a notification; and after its LISTEN connection is killed it reconnects by itself
and is woken again."""

from __future__ import annotations

import sys
import time

import pytest

from .conftest import Proc
from .pg_fixtures import PgFlow, pg_flow  # noqa: F401

POLL = 10.0  # the worker's poll interval: without a notification a run waits up to this
WOKEN_WITHIN = 2.0  # generous: a notified worker claims within milliseconds
PAUSES = (0.7, 2.3, 3.9)  # idle time before each start, so they fall anywhere in a poll


def _listeners(flow: PgFlow) -> list[int]:
    return [
        pid
        for (pid,) in flow.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query ILIKE 'LISTEN%'"
        )
    ]


def _start_and_time(flow: PgFlow, worker: Proc, n: int) -> tuple[float, float]:
    """Start a `ping` run from a `flowdesk start` process; returns (seconds from its
    creation to its claim, seconds from its creation to its end)."""
    run_id = flow.start("ping", {"n": n})
    flow.wait_until(
        lambda: flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,)) == [("succeeded",)],
        timeout=3 * POLL,
        what=f"ping {n} to finish",
        watch=[worker],
    )
    [(created, started, finished, output)] = flow.rows(
        "SELECT created_at, started_at, finished_at, output FROM runs WHERE id = ?", (run_id,)
    )
    assert flow.payload(run_id, 0, "output", output) == {"n": n, "pid": worker.pid}
    return (started - created) / 1000, (finished - created) / 1000


@pytest.mark.timeout(90)
def test_idle_worker_is_woken_by_notify_and_after_losing_its_listen_connection(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    worker = flow.worker(poll=POLL, lease=30, name="idle")
    flow.wait_until(
        lambda: len(_listeners(flow)) == 1, timeout=10, what="the worker to LISTEN", watch=[worker]
    )
    [first_listener] = _listeners(flow)

    delays: list[tuple[float, float]] = []
    for n, pause in enumerate(PAUSES):
        time.sleep(pause)
        delays.append(_start_and_time(flow, worker, n))
    for claimed, finished in delays:
        assert claimed < WOKEN_WITHIN, f"runs waited for a poll, not a notification: {delays}"
        assert finished < POLL, delays

    # -- the LISTEN connection dies; the worker must reconnect and be woken again -------
    killed = flow.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
    )
    assert killed == [(True,)], killed
    flow.wait_until(
        lambda: len(_listeners(flow)) == 1 and _listeners(flow) != [first_listener],
        timeout=15,
        what="the worker to LISTEN again on a new connection",
        watch=[worker],
    )
    after: list[tuple[float, float]] = []
    for n, pause in enumerate(PAUSES, start=len(PAUSES)):
        time.sleep(pause)
        after.append(_start_and_time(flow, worker, n))
    for claimed, finished in after:
        assert claimed < WOKEN_WITHIN, f"not woken after the LISTEN reconnect: {after}"
        assert finished < POLL, after

    assert worker.alive(), worker.describe()
    assert "LISTEN connection lost" in worker.output(), worker.describe()
    assert flow.stop(worker) == 0, worker.describe()
    assert "Traceback" not in worker.output(), worker.describe()
    assert flow.side("SELECT COUNT(*) FROM effects") == [(2 * len(PAUSES),)]
    sys.stderr.write(
        "claimed after (s): before the kill "
        f"{[round(c, 3) for c, _ in delays]}, after {[round(c, 3) for c, _ in after]}\n"
    )
