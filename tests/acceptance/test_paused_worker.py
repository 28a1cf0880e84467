"""A worker frozen (SIGSTOP) for longer than its lease, then thawed (SIGCONT): the pause
must not make any step run twice at the same time, whether another worker took the run
over meanwhile or nobody did."""

from __future__ import annotations

import time

import pytest

from .conftest import Flow, Proc

LEASE = 1.0


def _start_gated(flow: Flow) -> tuple[str, str]:
    gate = str(flow.root / "gate")
    run_id = flow.start("chain", {"steps": 3, "delay_ms": 30, "gate_seq": 2, "gate_path": gate})
    return run_id, gate


def _wait_at_gate(flow: Flow, run_id: str, worker: Proc) -> None:
    flow.wait_until(
        lambda: (
            flow.side("SELECT COUNT(*) FROM executions WHERE run_id = ? AND seq = 2", (run_id,))
            == [(1,)]
        ),
        timeout=20,
        what="step 2 to start",
        watch=[worker],
    )


def _wait_lease_expired(flow: Flow, run_id: str) -> None:
    flow.wait_until(
        lambda: (
            flow.rows("SELECT due_at FROM runs WHERE id = ?", (run_id,))[0][0]
            < time.time() * 1000 - 200
        ),
        timeout=10,
        what="the frozen worker's lease to expire",
    )


def _executions(flow: Flow, run_id: str) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for seq, pid in flow.side(
        "SELECT seq, pid FROM executions WHERE run_id = ? ORDER BY id", (run_id,)
    ):
        found.setdefault(seq, []).append(pid)
    return found


def _wait_finished(flow: Flow, run_id: str, watch: list[Proc]) -> None:
    flow.wait_until(
        lambda: (
            flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0]
            in ("succeeded", "failed", "cancelled")
        ),
        timeout=20,
        what="the run to finish",
        watch=watch,
    )


@pytest.mark.timeout(60)
def test_a_lone_worker_thawed_after_its_lease_runs_nothing_twice(flow: Flow) -> None:
    run_id, gate = _start_gated(flow)
    worker = flow.worker(lease=LEASE, poll=0.05, name="frozen")
    _wait_at_gate(flow, run_id, worker)
    flow.pause(worker)
    _wait_lease_expired(flow, run_id)
    open(gate, "w").close()
    flow.resume(worker)
    _wait_finished(flow, run_id, [worker])
    # A graceful stop lets every coroutine the worker still runs finish, so a second copy
    # of the run (if the thaw started one) has made all its executions by now.
    assert flow.stop(worker) == 0, worker.describe()

    assert flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,)) == [("succeeded",)]
    executions = _executions(flow, run_id)
    assert executions == {1: [worker.pid], 2: [worker.pid], 3: [worker.pid]}, (
        f"a step ran twice in the one worker that held the run: {executions}"
    )
    assert flow.side("SELECT COUNT(*) FROM effects WHERE run_id = ?", (run_id,)) == [(3,)]
    assert "Traceback" not in worker.output(), worker.describe()


@pytest.mark.timeout(60)
def test_a_worker_thawed_after_another_took_its_run_records_nothing(flow: Flow) -> None:
    run_id, gate = _start_gated(flow)
    frozen = flow.worker(lease=LEASE, poll=0.05, name="frozen")
    _wait_at_gate(flow, run_id, frozen)
    flow.pause(frozen)
    open(gate, "w").close()
    other = flow.worker(lease=LEASE, poll=0.05, name="other")
    _wait_finished(flow, run_id, [other])
    shown_before = flow.cli_json("runs", "show", run_id)
    flow.resume(frozen)
    # The thawed worker finishes its copy of step 2 (its effect is absorbed by the
    # idempotency key); its record of it must then be refused.
    flow.wait_until(
        lambda: (
            flow.side(
                "SELECT COUNT(*) FROM effect_writes WHERE key = ? AND pid = ?",
                (f"{run_id}:2", frozen.pid),
            )
            == [(1,)]
        ),
        timeout=20,
        what="the thawed worker to finish its copy of step 2",
        watch=[frozen],
    )
    # A graceful stop waits for whatever the thawed worker still does with the run.
    assert flow.stop(frozen) == 0, frozen.describe()

    shown = flow.cli_json("runs", "show", run_id)
    assert shown == shown_before, "the thawed worker changed a run it no longer held"
    assert shown["status"] == "succeeded"
    executions = _executions(flow, run_id)
    assert executions[1] == [frozen.pid]
    assert sorted(executions[2]) == sorted([frozen.pid, other.pid])
    assert executions[3] == [other.pid], executions
    writes = flow.side(
        "SELECT pid, inserted FROM effect_writes WHERE key = ? ORDER BY id", (f"{run_id}:2",)
    )
    assert sorted(writes) == sorted([(other.pid, 1), (frozen.pid, 0)])
    assert flow.stop(other) == 0, other.describe()
    for proc in (frozen, other):
        assert "Traceback" not in proc.output(), proc.describe()
