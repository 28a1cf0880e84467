"""Lease fencing on PostgreSQL, with real processes: a worker frozen (SIGSTOP) past its
lease and thawed (SIGCONT) after another worker took its run over cannot record a step
result over the new owner's, and does not go on executing the run; a worker thawed with
nobody else around does not execute its run twice."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Proc
from .pg_fixtures import PgFlow, pg_flow  # noqa: F401

LEASE = 1.5


def _start(flow: PgFlow, gated: list[int]) -> tuple[str, Path]:
    gates = flow.root / "gates"
    gates.mkdir()
    run_id = flow.start(
        "pidchain",
        {"steps": 3, "delay_ms": 40, "gate_dir": str(gates), "gated": gated},
    )
    return run_id, gates


def _open(gates: Path, index: int) -> None:
    (gates / f"gate-{index}").touch()


def _executions(flow: PgFlow, run_id: str) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for seq, pid in flow.side(
        "SELECT seq, pid FROM executions WHERE run_id = ? ORDER BY id", (run_id,)
    ):
        found.setdefault(seq, []).append(pid)
    return found


def _wait_executing(flow: PgFlow, run_id: str, seq: int, pid: int, watch: list[Proc]) -> None:
    flow.wait_until(
        lambda: bool(
            flow.side(
                "SELECT 1 FROM executions WHERE run_id = ? AND seq = ? AND pid = ?",
                (run_id, seq, pid),
            )
        ),
        timeout=20,
        what=f"process {pid} to start step {seq}",
        watch=watch,
    )


def _lease(flow: PgFlow, run_id: str) -> tuple[str, str | None, int | None, int]:
    [(status, owner, due_at, attempts)] = flow.rows(
        "SELECT status, lease_owner, due_at, attempts FROM runs WHERE id = ?", (run_id,)
    )
    return status, owner, due_at, attempts


def _owner_pid(flow: PgFlow, owner: str | None) -> int | None:
    rows = flow.rows("SELECT pid FROM workers WHERE id = ?", (owner,))
    return rows[0][0] if rows else None


def _wait_lease_expired(flow: PgFlow, run_id: str) -> None:
    flow.wait_until(
        lambda: (_lease(flow, run_id)[2] or 0) < time.time() * 1000 - 300,
        timeout=10,
        what="the frozen worker's lease to expire",
    )


def _wait_finished(flow: PgFlow, run_id: str, watch: list[Proc]) -> None:
    flow.wait_until(
        lambda: _lease(flow, run_id)[0] in ("succeeded", "failed", "cancelled"),
        timeout=30,
        what="the run to finish",
        watch=watch,
    )


def _steps(flow: PgFlow, run_id: str) -> dict[int, tuple[str, dict[str, Any], int]]:
    return {
        seq: (status, flow.payload(run_id, seq, "step.output", output), attempts)
        for seq, status, output, attempts in flow.rows(
            "SELECT seq, status, output, attempts FROM steps WHERE run_id = ? ORDER BY seq",
            (run_id,),
        )
    }


@pytest.mark.timeout(90)
@pytest.mark.parametrize("heartbeat", ["free", "held"])
def test_thawed_worker_cannot_record_over_the_worker_that_took_its_run(
    pg_flow: PgFlow,  # noqa: F811
    heartbeat: str,
) -> None:
    """``heartbeat="free"``: the thawed worker's first heartbeat tells it the run is gone,
    which usually happens before its step's result is ready. ``"held"``: the test holds
    the lock on A's row of ``workers`` from before the freeze until the end of the check,
    so A's heartbeat cannot answer; A's late step result then reaches the database, and
    the fence there (lease owner and status, checked under the run's row lock) must refuse
    it."""
    flow = pg_flow
    flow.init_db()
    run_id, gates = _start(flow, gated=[2, 3])
    a = flow.worker(lease=LEASE, poll=0.05, name="a")
    _wait_executing(flow, run_id, 2, a.pid, [a])
    status, owner_a, _, attempts = _lease(flow, run_id)
    assert (status, attempts, _owner_pid(flow, owner_a)) == ("running", 1, a.pid)

    with contextlib.ExitStack() as stack:
        if heartbeat == "held":
            blocker = stack.enter_context(flow.connect())
            blocker.autocommit = False
            stack.callback(blocker.rollback)
            assert blocker.execute(
                "SELECT 1 FROM workers WHERE id = %s FOR UPDATE", (owner_a,)
            ).fetchall() == [(1,)]

        # A freezes in the middle of step 2; its lease runs out.
        flow.pause(a)
        frozen_at = time.time()
        _wait_lease_expired(flow, run_id)
        _open(gates, 2)

        # B takes the run over: it replays step 1, executes step 2 and waits at gate 3.
        b = flow.worker(lease=LEASE, poll=0.05, name="b")
        _wait_executing(flow, run_id, 3, b.pid, [b])
        status, owner_b, _, attempts = _lease(flow, run_id)
        assert (status, attempts, _owner_pid(flow, owner_b)) == ("running", 2, b.pid)
        assert owner_b != owner_a
        steps_before = _steps(flow, run_id)
        assert steps_before[2][1]["pid"] == b.pid, steps_before

        # A thaws while B still holds the run. A's copy of step 2 finishes (gate 2 is
        # open; its effect is absorbed by the idempotency key); its result must be refused.
        flow.resume(a)
        thawed_at = time.time()
        flow.wait_until(
            lambda: bool(
                flow.side(
                    "SELECT 1 FROM effect_writes WHERE key = ? AND pid = ?",
                    (f"{run_id}:2", a.pid),
                )
            ),
            timeout=20,
            what="the thawed worker to finish its copy of step 2",
            watch=[a, b],
        )
        # Give A several heartbeats and polls to do whatever it would do with the run.
        time.sleep(3 * LEASE)
        if heartbeat == "held":
            blocked = flow.rows(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO workers%'"
            )
            assert blocked == [(1,)], "A's heartbeat was not held up by the test's lock"
            assert "lost the lease" not in a.output(), (
                "A learnt from a heartbeat, not from the refused record"
            )
        assert _steps(flow, run_id) == steps_before, "the thawed worker changed recorded steps"
        status, owner, _, attempts = _lease(flow, run_id)
        assert (status, owner, attempts) == ("running", owner_b, 2), (
            "the thawed worker took the run back from the worker that holds it"
        )
        late = flow.side(
            "SELECT seq, at FROM executions WHERE run_id = ? AND pid = ? AND at > ?",
            (run_id, a.pid, frozen_at),
        )
        assert late == [], f"the thawed worker executed steps of a run it no longer held: {late}"

    _open(gates, 3)
    _wait_finished(flow, run_id, [a, b])
    # A graceful stop waits for anything the thawed worker still does with the run.
    assert flow.stop(a) == 0, a.describe()
    assert flow.stop(b) == 0, b.describe()

    # -- the run is B's: its final output, and every step B executed ------------------
    [(status, output, attempts)] = flow.rows(
        "SELECT status, output, attempts FROM runs WHERE id = ?", (run_id,)
    )
    assert status == "succeeded"
    assert attempts == 2, "the run was claimed other than once by A, then once by B"
    result = flow.payload(run_id, 0, "output", output)
    assert (result["pid"], result["claim"]) == (b.pid, 2), result
    steps = _steps(flow, run_id)
    assert [(s[0], s[1]["pid"], s[1]["claim"], s[2]) for s in steps.values()] == [
        ("ok", a.pid, 1, 1),
        ("ok", b.pid, 2, 1),
        ("ok", b.pid, 2, 1),
    ], steps
    assert result["steps"] == [s[1] for s in steps.values()]

    # -- each effect once; A's late copy of step 2 was absorbed; A ran nothing else -------
    assert flow.side("SELECT key, pid FROM effects WHERE run_id = ? ORDER BY seq", (run_id,)) == [
        (f"{run_id}:1", a.pid),
        (f"{run_id}:2", b.pid),
        (f"{run_id}:3", b.pid),
    ]
    writes = flow.side(
        "SELECT pid, inserted FROM effect_writes WHERE key = ? ORDER BY id", (f"{run_id}:2",)
    )
    assert writes == [(b.pid, 1), (a.pid, 0)], writes
    assert _executions(flow, run_id) == {1: [a.pid], 2: [a.pid, b.pid], 3: [b.pid]}
    assert flow.side("SELECT detail FROM anomalies") == []
    for proc in (a, b):
        assert "Traceback" not in proc.output(), proc.describe()
    sys.stderr.write(f"[{heartbeat}] A thawed {thawed_at - frozen_at:.1f} s after freezing\n")


@pytest.mark.timeout(60)
def test_lone_worker_thawed_after_its_lease_runs_nothing_twice(
    pg_flow: PgFlow,  # noqa: F811
) -> None:
    flow = pg_flow
    flow.init_db()
    run_id, gates = _start(flow, gated=[2])
    a = flow.worker(lease=LEASE, poll=0.05, name="a")
    _wait_executing(flow, run_id, 2, a.pid, [a])
    flow.pause(a)
    _wait_lease_expired(flow, run_id)
    _open(gates, 2)
    flow.resume(a)
    _wait_finished(flow, run_id, [a])
    # A graceful stop lets every coroutine the worker still runs finish, so a second copy
    # of the run (had the thaw started one) has made all its executions by now.
    assert flow.stop(a) == 0, a.describe()

    [(status, output)] = flow.rows("SELECT status, output FROM runs WHERE id = ?", (run_id,))
    assert status == "succeeded"
    assert flow.payload(run_id, 0, "output", output)["pid"] == a.pid
    assert _executions(flow, run_id) == {1: [a.pid], 2: [a.pid], 3: [a.pid]}, (
        "a step ran twice in the one worker that held the run"
    )
    assert flow.side("SELECT COUNT(*) FROM effects WHERE run_id = ?", (run_id,)) == [(3,)]
    assert flow.side("SELECT COUNT(*) FROM effect_writes WHERE key LIKE ?", (f"{run_id}:%",)) == [
        (3,)
    ]
    assert "Traceback" not in a.output(), a.describe()
